"""Bridges on the connection: a prefill and a decode whose pages differ, made to fit at send time.

The handshake (``conn_handshake``) names a *send target* for a decode whose format or page size
differs from this prefill's (``handshake.send_target``); the ``MemhaKVManager`` part here:

* checks, once per decode registration (prefill bootstrap thread), that its pages can be
  converted for that decode (``_conversion_problem``; a reason rejects the decode);
* converts (``transcode``) and / or re-pages (``repage``) every chunk sent to it
  (``_send_converted``, transfer worker, blocking for the transfer);
* on a decode, accepts a prefill with another page size that SGLang's own check refuses
  (``_accept_repaged``, decode scheduler, from ``try_ensure_parallel_info``).

``virtualize_repaged_destination`` (AROUND ``TransferInfo.from_zmq``) feeds the re-paged sends
their decode pages. The bridges applied on *arrival* (fnuz <-> fn, in place, same row size) are
chosen per request by ``mooncake_conn.MemhaKVReceiver.init`` (``handshake.bridges_for``) and
applied by ``arrival.land_on_arrival``.
"""
from __future__ import annotations

import logging

import numpy as np

from sglang_memha.kvformat import Bridge, KVFormat
from sglang_memha.kvformat.layout import PoolLayout
from sglang_memha.sglang_ext import metrics, state
from sglang_memha.sglang_ext.transfer import handshake, repage

logger = logging.getLogger("sglang_memha")


class BridgeMixin:
    """Mixed into ``MemhaKVManager`` before SGLang's ``MooncakeKVManager``. Uses the manager's
    ``memha_desc``, ``memha_converter``, ``memha_sglang_cls`` and ``_refuse_prefill``
    (``conn_handshake``), and ``_memha_tls`` / ``_transfer_data`` (``conn_bytes``)."""

    def _send_converted(self, session, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices, target,
                        dst_item_len) -> int:
        """Pages for a decode the handshake bridged on the sender side: another format
        (``transcode``), another page size (``repage``), or both; the registration was checked
        for it (``_conversion_problem``). For a re-paged session ``dst_kv_indices`` are the
        chunk's page positions (``repage.virtual_positions``), mapped here through the decode's
        own pages."""
        src_p, dst_p = self.memha_desc.page_size, target.page_size
        if src_p == dst_p:
            tokens = repage.token_map(prefill_kv_indices, np.arange(len(prefill_kv_indices)),
                                      dst_kv_indices, src_p, dst_p)
        else:
            info = self.transfer_infos.get(self._memha_tls.room, {}).get(session)
            dst_pages = getattr(info, "memha_decode_pages", None)
            if dst_pages is None or info.dst_device_kv_indices is not None:
                logger.error("sglang-memha: room %s: re-paged session %s has %s", self._memha_tls.room, session,
                             "no recorded decode pages" if dst_pages is None else
                             "HiSparse device pages, which are not re-paged")
                return -1
            try:
                tokens = repage.token_map(prefill_kv_indices, dst_kv_indices, dst_pages, src_p, dst_p,
                                          getattr(self._memha_tls, "chunk_tokens", None))
            except ValueError as e:
                logger.error("sglang-memha: room %s: %s", self._memha_tls.room, e)
                return -1
        if target.fmt != self.memha_desc.fmt:
            ret = self.memha_converter.send(self._transfer_data, session, prefill_kv_indices, target,
                                            dst_kv_ptrs, repage.runs(tokens.staged_rows, tokens.dst_slots),
                                            int(dst_item_len))
            if ret == 0:
                metrics.pages_converted(self.memha_desc.fmt.value, target.fmt.value, len(prefill_kv_indices))
            return ret
        # same format, another page size: every buffer's token rows go as they are
        row_runs = repage.runs(tokens.src_slots, tokens.dst_slots)
        blocks = []
        for src, dst, src_item, dst_token in zip(self.kv_args.kv_data_ptrs, dst_kv_ptrs, self.kv_args.kv_item_lens,
                                                 PoolLayout.of(target).token_lens()):
            blocks += repage.blocks(row_runs, src, dst, src_item // src_p, dst_token)
        return self._transfer_data(session, blocks)

    def _conversion_problem(self, registration_info, target) -> str | None:
        """Prefill, bootstrap thread: why pages cannot be converted for this decode, or None."""
        local = self.memha_desc
        what = target_note(local, target).removeprefix("; ")
        fix = ("use the same MEMHA_KV_FORMAT and --page-size on both servers"
               if target.page_size != local.page_size else "use the same MEMHA_KV_FORMAT on both servers")
        dst_layout = PoolLayout.of(target)
        want = dst_layout.item_lens()[0]
        if self.pp_size != 1 or len(registration_info.dst_kv_ptrs) != len(dst_layout.entries):
            return (f"{what}: supported for one pipeline stage and plain MHA KV registrations only "
                    f"(decode registered {len(registration_info.dst_kv_ptrs)} KV buffers, a {target.fmt.value} "
                    f"pool of format v4 has {len(dst_layout.entries)}); {fix}")
        if registration_info.dst_kv_item_len != want:
            return (f"decode registered {registration_info.dst_kv_item_len} B per {target.fmt.value} page, "
                    f"expected {want} ({target.page_size} tokens); {fix}")
        if target.page_size != local.page_size:
            if getattr(registration_info, "requires_dcp_relayout", False):
                return f"{what}: not combined with a DCP relayout of the decode's KV; {fix}"
            states = getattr(self.kv_args, "state_types", None) or []
            if states:
                return (f"{what}: this prefill's KV has state components "
                        f"{[getattr(t, 'value', t) for t in states]}, which are not re-paged; {fix}")
            rows = dst_layout.token_lens()
            if target.fmt == local.fmt and list(self.kv_args.kv_item_lens) != [local.page_size * t for t in rows]:
                return (f"{what}: prefill pages of {sorted(set(self.kv_args.kv_item_lens))} B are not "
                        f"{local.page_size} tokens of the decode's {sorted(set(rows))} B rows; {fix}")
        if local.fmt == KVFormat.FP8_E4M3_TENSOR and target.fmt != local.fmt:
            from sglang_memha.sglang_ext.transfer.transcode import scale_problem, sender_bridge

            exact = sender_bridge(local, target) == Bridge.LAYER_TO_TOKEN_SCALE  # else re-quantized
            return scale_problem(state.local_pool(), bf16_exact=exact)
        return None

    def _accept_repaged(self, bootstrap_addr: str, prefill_page: int) -> bool:
        """Decode scheduler: SGLang's checks again with the prefill's page size
        (``repage.PageSizeProbe``), then ``repage.acceptance_problem``; only an accepted prefill's
        info is published to SGLang. Formats are judged per request (``MemhaKVReceiver.init``)."""
        probe = repage.PageSizeProbe(self, prefill_page)
        stock = self.memha_sglang_cls.try_ensure_parallel_info  # SGLang's (the module name is ours now)
        try:
            ready = stock(probe, bootstrap_addr)
        except Exception as e:  # noqa: BLE001 - any raise here would end the decode scheduler
            return self._refuse_prefill(bootstrap_addr, f"{type(e).__name__}: {e}")
        if not ready:
            return False
        info = probe.prefill_info_table[bootstrap_addr]
        desc = handshake.layout_descriptor(getattr(info, "kv_layout", None))
        problem = repage.acceptance_problem(self.kv_args.page_size, prefill_page, desc,
                                            _decode_radix_cache(), getattr(self.kv_args, "state_types", None),
                                            bootstrap_addr)
        if problem is not None:
            return self._refuse_prefill(bootstrap_addr, problem)
        self.memha_refused_prefills.pop(bootstrap_addr, None)
        self.prefill_info_table[bootstrap_addr] = info
        logger.warning("sglang-memha: prefill at %s has page_size=%d, this decode %d: it re-pages what "
                       "it sends", bootstrap_addr, prefill_page, self.kv_args.page_size)
        return True


def _decode_radix_cache() -> bool:
    """``--disaggregation-decode-enable-radix-cache`` of this (decode) process; True when it
    cannot be read (the stricter answer: never raise in ``try_ensure_parallel_info``)."""
    try:
        from sglang.srt.runtime_context import get_disagg

        return bool(get_disagg().disaggregation_decode_enable_radix_cache)
    except Exception:  # noqa: BLE001 - an unpublished config must not end the scheduler
        return True


def target_note(local, target) -> str:
    """How this prefill's pages reach a decode described by ``target`` (None: as they are)."""
    if target is None:
        return ""
    notes = []
    if target.fmt != local.fmt:
        requantized = Bridge.REQUANTIZE_ON_SEND in target.check_compatible(local)
        notes.append(f"pages converted on send {local.fmt.value} -> {target.fmt.value}"
                     + (" (dequantized and re-quantized: rounded twice)" if requantized else ""))
    if target.page_size != local.page_size:
        notes.append(f"re-paged on send, page_size {local.page_size} -> {target.page_size}")
    return "; " + "; ".join(notes)


def virtualize_repaged_destination(original, cls, msg):
    """AROUND ``TransferInfo.from_zmq`` (prefill bootstrap thread, once per request and decode
    rank, after ``_handle_abort_notification`` admitted the message): SGLang's parse; for a
    re-paged decode session the decode's pages move to ``.memha_decode_pages`` and
    ``dst_kv_indices`` becomes the prefill page positions they cover, which is what the
    transfer worker's prefill-page slice must index (``repage`` module docstring)."""
    info = original(cls, msg)
    sizes = repage.session_page_sizes(info.mooncake_session_id)
    if sizes is not None and not info.is_dummy:
        info.memha_decode_pages = np.asarray(info.dst_kv_indices, dtype=np.int64)
        info.dst_kv_indices = repage.virtual_positions(len(info.dst_kv_indices), *sizes)
    return info
