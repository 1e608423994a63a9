"""Handshake and authentication on the connection: the ``MemhaKVManager`` part that checks peers.

Only when ``MEMHA_KV_FORMAT`` is set (``memha_desc`` not None; a prefill on SGLang's own pool is
described too, ``kv_hooks``). Prefill publishes its ``FormatDescriptor`` in ``KVArgs.kv_layout``
(``handshake.encode_layout``, set in ``MemhaKVManager.__init__``), which SGLang's bootstrap
server carries to decode in ``PrefillServerInfo.kv_layout``. Decode appends one frame
``MEMHA1<descriptor>`` to its registration message (and, with ``MEMHA_SHARED_SECRET``, HMAC tags
over its registration and every room's metadata). Each side checks the other's descriptor and
fails *the request* (``KVPoll.Failed`` with the reason) on a mismatch; SGLang's own Failed paths
free the pages on both sides. Nothing here raises inside SGLang's ``try_ensure_parallel_info``
(a raise there kills the decode scheduler): a refused prefill is remembered
(``memha_refused_prefills``) and its requests fail with the reason.

The verdicts themselves are pure functions in ``handshake``; this module calls them from SGLang's
threads (scheduler, bootstrap thread), none blocking beyond the overridden SGLang method. Every
refusal is also counted by its cause (``metrics.handshake_refused``; a no-op without
``--enable-metrics``).
"""
from __future__ import annotations

import logging
import re

from sglang.srt.disaggregation.utils import DisaggregationMode

from sglang_memha.sglang_ext import metrics
from sglang_memha.sglang_ext.transfer import handshake, repage
from sglang_memha.sglang_ext.transfer.conn_bridges import target_note

logger = logging.getLogger("sglang_memha")


class HandshakeMixin:
    """Mixed into ``MemhaKVManager`` before SGLang's ``MooncakeKVManager`` (``super()`` is
    SGLang's). Uses the manager's ``memha_desc``, ``memha_stock``, ``memha_secret``,
    ``memha_send_targets``, ``memha_refused_prefills``, and ``_conversion_problem`` /
    ``_accept_repaged`` (``conn_bridges``)."""

    def build_receiver_registration_message(self):
        """Decode side: SGLang's registration frames plus ``MEMHA1<descriptor>`` (ignored by a
        stock prefill, whose parser reads fixed indices)."""
        msg = super().build_receiver_registration_message()
        if self.memha_desc is not None:
            msg.append(handshake.encode_frame(self.memha_desc))
            if self.memha_secret:
                msg.append(handshake.encode_tag_frame(self.memha_desc, msg, self.memha_secret))
        return msg

    def build_receiver_metadata_message(self, **kwargs):
        """Decode side, scheduler thread, once per request and prefill rank: SGLang's metadata
        frames plus, with a shared secret, a ``MEMHAT`` tag over them (the prefill refuses an
        untagged room from a decode that registered with a tag)."""
        msg = super().build_receiver_metadata_message(**kwargs)
        if self.memha_desc is not None and self.memha_secret:
            msg.append(handshake.encode_room_tag_frame(msg, self.memha_secret))
        return msg

    def _handle_abort_notification(self, msg) -> bool:
        """Prefill side, bootstrap thread, every decode message except SGLang's staging ones,
        before SGLang parses it (True = consumed). Besides SGLang's abort notices, this is the
        gate for per-request metadata: ``handshake.check_room_message`` refuses a malformed
        message (SGLang's parser would raise and end the bootstrap thread), a room naming an
        unregistered decode session, or an untagged / wrongly tagged room when a secret is set.
        A refused message is logged and dropped: no transfer info, so no byte is written for
        it, and a genuine message for the same room still goes through. Non-blocking."""
        if super()._handle_abort_notification(msg):
            return True
        if self.disaggregation_mode != DisaggregationMode.PREFILL or not msg or msg[0] == b"None":
            return False
        reason = handshake.check_room_message(msg, self.memha_secret if self.memha_desc else None,
                                              self.decode_kv_args_table, self.state_layout_rejections)
        if reason is not None:
            logger.error("sglang-memha: %s", reason)
            metrics.handshake_refused(reason.kind)
        return reason is not None

    def _validate_peer_state_layout(self, registration_info):
        """Prefill side, bootstrap thread, once per decode registration. A reason rejects the
        peer: SGLang's transfer worker then fails each of its rooms with that reason."""
        fully_checked, mismatch = super()._validate_peer_state_layout(registration_info)
        session = registration_info.mooncake_session_id
        self.memha_send_targets.pop(session, None)
        self.memha_sliced.pop(session, None)
        repage.forget_session(session)
        frame = getattr(registration_info, "memha_frame", None)
        if mismatch is None and self.memha_desc is not None and not (frame is None and self.memha_stock):
            peer = f"{registration_info.endpoint}:{registration_info.dst_port}"
            tag_reason = None if frame is None else handshake.check_registration_tag(
                self.memha_secret, frame, getattr(registration_info, "memha_msg", []), peer)
            tp = (registration_info.dst_attn_tp_size, self.attn_tp_size)  # (decode, prefill)
            mismatch = tag_reason or handshake.check_decode_peer(self.memha_desc, frame, peer=peer, tp=tp)
            if mismatch is not None:
                logger.error("sglang-memha: %s", mismatch)
                metrics.handshake_refused(mismatch.kind)
            else:  # once per decode; names the session its rooms' metadata must carry
                target = handshake.send_target(self.memha_desc, frame, tp)
                if tp[0] != tp[1]:  # the descriptor check refused a send target with it
                    mismatch = self._head_slice_problem(registration_info, handshake.frame_descriptor(frame))
                    if mismatch is not None:
                        logger.error("sglang-memha: decode at %s: %s", peer, mismatch)
                        metrics.handshake_refused("conversion")
                        return fully_checked, mismatch
                if target is not None:
                    mismatch = self._conversion_problem(registration_info, target)
                    if mismatch is not None:
                        logger.error("sglang-memha: decode at %s: %s", peer, mismatch)
                        metrics.handshake_refused("conversion")
                        return fully_checked, mismatch
                    self.memha_send_targets[session] = target
                    if target.page_size != self.memha_desc.page_size:
                        repage.register_session(session, self.memha_desc.page_size, target.page_size)
                logger.warning("sglang-memha: decode at %s registered: session %s%s%s", peer, session,
                               target_note(self.memha_desc, target),
                               f"; KV heads sliced on send, attention TP {tp[1]} -> {tp[0]}" if tp[0] != tp[1] else "")
        return fully_checked, mismatch

    def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
        """Decode scheduler, once per prefill address until it answers. SGLang raises here when
        the prefill's page size, KV dtype or layout differs from this decode's, and the raise
        ends the decode scheduler (the whole server) over one misconfigured prefill. Here a
        page-size difference that the prefill re-pages is accepted (``_accept_repaged``); any
        other refusal is kept and the address reported not ready: SGLang retries, then aborts
        that prefill's requests (``MemhaKVReceiver.abort`` gives them the reason); the server
        and requests from other prefills go on. Blocks only on SGLang's bootstrap GET (5 s)."""
        try:
            ready = super().try_ensure_parallel_info(bootstrap_addr)
        except RuntimeError as e:
            prefill_page = repage.prefill_page_size(str(e))
            dtype = _prefill_kv_dtype(str(e)) if self.memha_stock else None
            if dtype is not None:
                return self._accept_memha_fp8_prefill(bootstrap_addr, dtype)
            if prefill_page is None:
                return self._refuse_prefill(bootstrap_addr, str(e))
            if self.memha_desc is None:
                return self._refuse_prefill(bootstrap_addr, f"{e} (sglang-memha re-pages only for a decode "
                                                            f"with MEMHA_KV_FORMAT set)")
            return self._accept_repaged(bootstrap_addr, prefill_page)
        self.memha_refused_prefills.pop(bootstrap_addr, None)  # fixed and restarted
        return ready

    def _accept_memha_fp8_prefill(self, bootstrap_addr: str, prefill_dtype: str) -> bool:
        """Decode scheduler, this decode on SGLang's own fp8 pool: SGLang refused a prefill whose
        ``--kv-cache-dtype`` differs. A memha prefill on an ``fp8_e4m3_tensor`` pool keeps
        ``--kv-cache-dtype auto`` yet writes the bytes this pool reads: SGLang's checks run again
        with the prefill's dtype (``repage.ManagerProbe``), then its descriptor is judged (format, layer
        scales, page size); only an accepted prefill's info is published to SGLang."""
        probe = repage.ManagerProbe(self, kv_cache_dtype_str=prefill_dtype)
        try:
            ready = self.memha_sglang_cls.try_ensure_parallel_info(probe, bootstrap_addr)
        except Exception as e:  # noqa: BLE001 - any raise here would end the decode scheduler
            return self._refuse_prefill(bootstrap_addr, f"{type(e).__name__}: {e}")
        if not ready:
            return False
        info = probe.prefill_info_table[bootstrap_addr]
        layout = getattr(info, "kv_layout", None)
        if handshake.layout_descriptor(layout) is None:
            return self._refuse_prefill(bootstrap_addr, (
                f"KV cache dtype mismatch: prefill has kv_cache_dtype={prefill_dtype}, this decode runs "
                f"SGLang's fp8 pool (fp8_e4m3); only an sglang-memha prefill with "
                f"MEMHA_KV_FORMAT=fp8_e4m3_tensor writes its bytes: set that there, or the same --kv-cache-dtype"))
        tp = (self.attn_tp_size, getattr(info, "attn_tp_size", self.attn_tp_size))
        reason = handshake.check_prefill_peer(self.memha_desc, layout, bootstrap_addr, self.memha_secret, tp,
                                              local_stock=True)
        if reason is not None:
            return self._refuse_prefill(bootstrap_addr, reason)
        self.memha_refused_prefills.pop(bootstrap_addr, None)
        self.prefill_info_table[bootstrap_addr] = info
        logger.warning("sglang-memha: prefill at %s (kv_cache_dtype=%s, fp8_e4m3_tensor pages, the same layer "
                       "scales) feeds this decode's fp8 pool", bootstrap_addr, prefill_dtype)
        return True

    def _refuse_prefill(self, bootstrap_addr: str, reason: str) -> bool:
        """Decode scheduler: remember why ``bootstrap_addr`` is refused; SGLang asks again until it
        gives up, so the refusal is counted once per address and reason."""
        why = f"prefill at {bootstrap_addr} refused: {reason}"
        if self.memha_refused_prefills.get(bootstrap_addr) != why:
            metrics.handshake_refused("prefill_layout")
        self.memha_refused_prefills[bootstrap_addr] = why
        logger.error("sglang-memha: prefill at %s refused (its requests fail, this server goes on): %s",
                     bootstrap_addr, reason)
        return False


_KV_DTYPE_REFUSAL = re.compile(r"^KV cache dtype mismatch: prefill server has kv_cache_dtype=([^,\s]+),")


def _prefill_kv_dtype(error: str) -> str | None:
    """The prefill's ``--kv-cache-dtype`` in SGLang's dtype refusal (``common/conn.py``), or None."""
    m = _KV_DTYPE_REFUSAL.match(error)
    return m.group(1) if m else None


def attach_memha_frame(original, cls, msg):
    """AROUND ``KVArgsRegisterInfo.from_zmq``: SGLang's parse, plus the raw ``MEMHA1`` frame
    (or None) as ``.memha_frame`` and the frames themselves as ``.memha_msg`` (the shared-secret
    tag covers some of them) for ``MemhaKVManager._validate_peer_state_layout``."""
    info = original(cls, msg)
    info.memha_frame = handshake.find_frame(msg)
    info.memha_msg = list(msg)
    return info
