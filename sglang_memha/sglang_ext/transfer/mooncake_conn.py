"""SGLang's Mooncake KV manager / sender / receiver with the sglang-memha additions.

Installed by ``hooks.register_scheduler_hooks`` as HookRegistry REPLACEs of
``sglang.srt.disaggregation.mooncake.conn.Mooncake{KVManager,KVReceiver}``. The
bootstrap protocol (router ``bootstrap_host/port/room``, the bootstrap server's ``/route``, the
ZMQ registration and metadata messages) is SGLang's; we only add to it:

* **Handshake** (only when ``MEMHA_KV_FORMAT`` is set). Prefill publishes its
  ``FormatDescriptor`` in ``KVArgs.kv_layout`` (``handshake.encode_layout``), which SGLang's
  bootstrap server carries to decode in ``PrefillServerInfo.kv_layout``. Decode appends one
  frame ``MEMHA1<descriptor>`` to its registration message. Each side checks the other's
  descriptor and fails *the request* (``KVPoll.Failed`` with the reason) on a mismatch; SGLang's
  own Failed paths free the pages on both sides. Nothing here raises inside SGLang's
  ``try_ensure_parallel_info`` (a raise there kills the decode scheduler).
* **Measured bytes** (always). ``_transfer_data`` is where Mooncake's ``batch_transfer_sync``
  runs; the bytes of every call that returned 0 are added to the room the transfer worker is
  serving, split into KV pages vs everything else (aux metadata, state). When the room
  concludes, one log line ``sglang-memha transfer room=... fmt=... pages=... kv_bytes=...
  total_bytes=... transfer_ms=... status=...`` is written (WARNING, so it survives any
  ``--log-level``).
* **Send-time bridges**: a decode in another format (``transcode``) or with another page size
  (``repage``) gets its pages converted / re-paged by ``_send_converted``; the decode accepts a
  prefill with another page size in ``try_ensure_parallel_info`` (``_accept_repaged``).
The sender is not replaced here: ``cpu_compat`` owns that REPLACE (one owner per target).

All methods run in SGLang's threads (scheduler, bootstrap thread, transfer workers); none blocks
beyond what the overridden SGLang method already does.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.mooncake import conn as mc
from sglang.srt.disaggregation.utils import DisaggregationMode

from sglang_memha.config import load_config
from sglang_memha.kvformat import KVFormat
from sglang_memha.kvformat.layout import PoolLayout
from sglang_memha.sglang_ext import state
from sglang_memha.sglang_ext.transfer import handshake, repage
from sglang_memha.sglang_ext.transfer.pipeline import LayerPipeline

logger = logging.getLogger("sglang_memha")


@dataclass
class _RoomStats:
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0
    kv_bytes: int = 0
    other_bytes: int = 0
    pages: int = 0
    pipelined_pages: int = 0
    failed_calls: int = 0
    wire_fmt: str | None = None  # set when pages were converted on send (the decode's format)


class _RoomTrackingQueue:
    """Wraps a transfer worker's queue so the worker thread knows which room it serves, and how
    many tokens the chunk holds (a re-paged send writes exactly those)."""

    def __init__(self, queue, tls: threading.local):
        self._queue, self._tls = queue, tls

    def get(self, *args, **kwargs):
        chunk = self._queue.get(*args, **kwargs)
        self._tls.room = getattr(chunk, "room", None)
        self._tls.chunk_tokens = getattr(chunk, "num_kv_tokens", None)
        return chunk

    def __getattr__(self, name):
        return getattr(self._queue, name)


class MemhaKVManager(mc.MooncakeKVManager):
    def __init__(self, args, disaggregation_mode, server_args, is_mla_backend=False):
        self._memha_tls = threading.local()
        self._memha_lock = threading.Lock()
        self._memha_rooms: dict[int, _RoomStats] = {}
        self.memha_desc = state.local_descriptor()  # None: the quantized-KV path is off
        # A prefill on SGLang's own pool: described for memha decodes, stock for the others.
        self.memha_stock = state.local_is_stock()
        self.memha_bridges: dict[int, list] = {}  # decode: room -> bridges to apply on arrival
        # prefill: decode session -> its descriptor, when pages must be converted on send
        self.memha_send_targets: dict[str, object] = {}
        self.memha_converter = None
        self.memha_refused_prefills: dict[str, str] = {}  # decode: address -> why its info was refused
        cfg = load_config()
        self.memha_secret = cfg.shared_secret
        if self.memha_desc is not None and disaggregation_mode == DisaggregationMode.PREFILL:
            # Read by CommonKVManager.__init__ and published to the bootstrap server (/route).
            args.kv_layout = handshake.encode_layout(self.memha_desc, self.memha_secret)
        super().__init__(args, disaggregation_mode, server_args, is_mla_backend)
        if self.memha_desc is not None and disaggregation_mode == DisaggregationMode.PREFILL:
            from sglang_memha.sglang_ext.transfer.transcode import Converter

            self.memha_converter = Converter(self.engine, state.local_pool(), self.memha_desc)
        self.memha_pipeline = None
        if cfg.pipeline and self.memha_desc is not None and disaggregation_mode == DisaggregationMode.PREFILL:
            self.memha_pipeline = LayerPipeline(self, cfg.pipeline_min_tokens)

    # ---- handshake -------------------------------------------------------------------------
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
        return reason is not None

    def _validate_peer_state_layout(self, registration_info):
        """Prefill side, bootstrap thread, once per decode registration. A reason rejects the
        peer: SGLang's transfer worker then fails each of its rooms with that reason."""
        fully_checked, mismatch = super()._validate_peer_state_layout(registration_info)
        session = registration_info.mooncake_session_id
        self.memha_send_targets.pop(session, None)
        repage.forget_session(session)
        frame = getattr(registration_info, "memha_frame", None)
        if mismatch is None and self.memha_desc is not None and not (frame is None and self.memha_stock):
            peer = f"{registration_info.endpoint}:{registration_info.dst_port}"
            tag_reason = None if frame is None else handshake.check_registration_tag(
                self.memha_secret, frame, getattr(registration_info, "memha_msg", []), peer)
            mismatch = tag_reason or handshake.check_decode_peer(self.memha_desc, frame, peer=peer)
            if mismatch is not None:
                logger.error("sglang-memha: %s", mismatch)
            else:  # once per decode; names the session its rooms' metadata must carry
                target = handshake.send_target(self.memha_desc, frame)
                if target is not None:
                    mismatch = self._conversion_problem(registration_info, target)
                    if mismatch is not None:
                        logger.error("sglang-memha: decode at %s: %s", peer, mismatch)
                        return fully_checked, mismatch
                    self.memha_send_targets[session] = target
                    if target.page_size != self.memha_desc.page_size:
                        repage.register_session(session, self.memha_desc.page_size, target.page_size)
                logger.warning("sglang-memha: decode at %s registered: session %s%s", peer, session,
                               _target_note(self.memha_desc, target))
        return fully_checked, mismatch

    # ---- measured bytes --------------------------------------------------------------------
    def transfer_worker(self, queue, executor, *args, **kwargs):
        return super().transfer_worker(_RoomTrackingQueue(queue, self._memha_tls), executor, *args, **kwargs)

    def _room_stats(self) -> _RoomStats | None:
        room = getattr(self._memha_tls, "room", None)
        if room is None:
            return None
        with self._memha_lock:
            return self._memha_rooms.setdefault(room, _RoomStats())

    def send_kvcache(self, mooncake_session_id, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices,
                     *args, **kwargs):
        """Transfer worker, once per chunk and decode session; blocks for the transfer. With the
        pipeline on, pages a per-layer plan already shipped are waited for and left out
        (``LayerPipeline.claim``). A decode session with a send target (another format or page
        size) goes to ``_send_converted``; the pipeline never plans those."""
        stats = self._room_stats()
        target = self.memha_send_targets.get(mooncake_session_id)
        if stats is not None:
            asked = len(prefill_kv_indices)
            stats.pages += asked
            if self.memha_pipeline is not None and target is None:  # plans skip converted sessions
                prefill_kv_indices, dst_kv_indices, status = self.memha_pipeline.claim(
                    self._memha_tls.room, mooncake_session_id, np.asarray(prefill_kv_indices),
                    np.asarray(dst_kv_indices))
                if status != 0:
                    return status
                stats.pipelined_pages += asked - len(prefill_kv_indices)  # delivered during the forward
                if len(prefill_kv_indices) == 0:
                    return 0
        self._memha_tls.phase = "kv"
        try:
            if target is not None:
                if stats is not None:
                    stats.wire_fmt = target.fmt.value
                return self._send_converted(mooncake_session_id, prefill_kv_indices, dst_kv_ptrs,
                                            dst_kv_indices, target, kwargs.get("dst_kv_item_len"))
            return super().send_kvcache(mooncake_session_id, prefill_kv_indices, dst_kv_ptrs,
                                        dst_kv_indices, *args, **kwargs)
        finally:
            self._memha_tls.phase = None

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
            return self.memha_converter.send(self._transfer_data, session, prefill_kv_indices, target,
                                             dst_kv_ptrs, repage.runs(tokens.staged_rows, tokens.dst_slots),
                                             int(dst_item_len))
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
        what = _target_note(local, target).removeprefix("; ")
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
        if self.memha_desc.fmt == KVFormat.FP8_E4M3_TENSOR:
            from sglang_memha.sglang_ext.transfer.transcode import scale_problem

            return scale_problem(state.local_pool())
        return None

    def _transfer_data(self, mooncake_session_id, transfer_blocks):
        ret = super()._transfer_data(mooncake_session_id, transfer_blocks)
        stats = self._room_stats()
        if stats is not None and transfer_blocks:
            if ret == 0:
                moved = sum(int(b[2]) for b in transfer_blocks)
                if getattr(self._memha_tls, "phase", None) == "kv":
                    stats.kv_bytes += moved
                else:
                    stats.other_bytes += moved
            else:
                stats.failed_calls += 1
            stats.ended = time.perf_counter()
        return ret

    def conclude_transfer(self, *, bootstrap_room, status, targets=None, failure_reason=None):
        emitted = super().conclude_transfer(bootstrap_room=bootstrap_room, status=status,
                                            targets=targets, failure_reason=failure_reason)
        if emitted in (KVPoll.Success, KVPoll.Failed):
            if self.memha_pipeline is not None:
                self.memha_pipeline.forget(bootstrap_room)
            self._log_room(bootstrap_room, "ok" if emitted == KVPoll.Success else "failed")
        self._sweep_rooms()
        return emitted

    def _log_room(self, room: int, status: str) -> None:
        with self._memha_lock:
            stats = self._memha_rooms.pop(room, None)
        if stats is not None:
            fmt = stats.wire_fmt or (self.memha_desc.fmt.value if self.memha_desc is not None
                                     and not self.memha_stock else "stock")
            ms = max(stats.ended - stats.started, 0.0) * 1e3
            logger.warning(
                "sglang-memha transfer room=%s fmt=%s pages=%d pipelined_pages=%d kv_bytes=%d "
                "total_bytes=%d transfer_ms=%.2f status=%s", room, fmt, stats.pages,
                stats.pipelined_pages, stats.kv_bytes, stats.kv_bytes + stats.other_bytes, ms, status)

    def _sweep_rooms(self) -> None:
        """Rooms SGLang cleared without a conclude (aborted, failed by the decode or a dead
        peer, skipped by the worker) still get their transfer line (``status=aborted``), at
        the next conclude, so the per-room stats cannot grow without bound."""
        with self._memha_lock:
            gone = [r for r in self._memha_rooms if r not in self.request_status]
        for room in gone:
            self._log_room(room, "aborted")

    def _maybe_ack_drained_abort(self, room: int) -> None:
        """SGLang (transfer worker, bootstrap thread, sender ``clear``) acks a decode's abort of
        ``room`` once the room's chunks drained, and the decode then reuses its pages. Layers the
        pipeline still has on the wire count as undrained: the pipeline calls this again when
        the room's last plan is done."""
        if self.memha_pipeline is not None and self.memha_pipeline.in_flight(room):
            return
        super()._maybe_ack_drained_abort(room)

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
            if prefill_page is None:
                return self._refuse_prefill(bootstrap_addr, str(e))
            if self.memha_desc is None:
                return self._refuse_prefill(bootstrap_addr, f"{e} (sglang-memha re-pages only for a decode "
                                                            f"with MEMHA_KV_FORMAT set)")
            return self._accept_repaged(bootstrap_addr, prefill_page)
        self.memha_refused_prefills.pop(bootstrap_addr, None)  # fixed and restarted
        return ready

    def _accept_repaged(self, bootstrap_addr: str, prefill_page: int) -> bool:
        """Decode scheduler: SGLang's checks again with the prefill's page size
        (``repage.PageSizeProbe``), then ``repage.acceptance_problem``; only an accepted prefill's
        info is published to SGLang. Formats are judged per request (``MemhaKVReceiver.init``)."""
        probe = repage.PageSizeProbe(self, prefill_page)
        stock = MemhaKVManager.__bases__[0].try_ensure_parallel_info  # SGLang's (the module name is ours now)
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

    def _refuse_prefill(self, bootstrap_addr: str, reason: str) -> bool:
        self.memha_refused_prefills[bootstrap_addr] = f"prefill at {bootstrap_addr} refused: {reason}"
        logger.error("sglang-memha: prefill at %s refused (its requests fail, this server goes on): %s",
                     bootstrap_addr, reason)
        return False


def _decode_radix_cache() -> bool:
    """``--disaggregation-decode-enable-radix-cache`` of this (decode) process; True when it
    cannot be read (the stricter answer: never raise in ``try_ensure_parallel_info``)."""
    try:
        from sglang.srt.runtime_context import get_disagg

        return bool(get_disagg().disaggregation_decode_enable_radix_cache)
    except Exception:  # noqa: BLE001 - an unpublished config must not end the scheduler
        return True


class MemhaKVReceiver(mc.MooncakeKVReceiver):
    def init(self, prefill_dp_rank: int):
        """Decode scheduler, once per request before allocation: SGLang's init, then the
        descriptor check against the prefill's published layout."""
        super().init(prefill_dp_rank)
        local = self.kv_mgr.memha_desc if isinstance(self.kv_mgr, MemhaKVManager) else None
        if local is None or self.conclude_state == KVPoll.Failed:
            return
        info = self.kv_mgr.prefill_info_table.get(self.bootstrap_addr)
        reason = handshake.check_prefill_peer(local, getattr(info, "kv_layout", None),
                                              peer=self.bootstrap_addr, secret=self.kv_mgr.memha_secret)
        if reason is None:
            bridges = handshake.bridges_for(local, info.kv_layout)
            if bridges:
                self.kv_mgr.memha_bridges[self.bootstrap_room] = bridges
            return
        logger.error("sglang-memha: room %s: %s", self.bootstrap_room, reason)
        self.kv_mgr.record_failure(self.bootstrap_room, reason)
        self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
        self.conclude_state = KVPoll.Failed
        # Tell the prefill ranks, which would otherwise wait for this request's metadata.
        self.ensure_abort_notified()

    def abort(self):
        """Decode scheduler: SGLang aborts the requests of a prefill whose info never became
        ready; for one refused by ``try_ensure_parallel_info`` the failure carries the reason."""
        reason = getattr(self.kv_mgr, "memha_refused_prefills", {}).get(self.bootstrap_addr)
        if reason is not None and self.conclude_state != KVPoll.Failed:
            self.kv_mgr.record_failure(self.bootstrap_room, reason)
            self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
            self.conclude_state = KVPoll.Failed
        return super().abort()

    def failure_exception(self):
        """A failed room never reaches the arrival hook: drop its bridges here (SGLang calls
        this on every failure path, then raises the reason to the scheduler)."""
        if isinstance(self.kv_mgr, MemhaKVManager):
            self.kv_mgr.memha_bridges.pop(self.bootstrap_room, None)
        return super().failure_exception()


def _target_note(local, target) -> str:
    """How this prefill's pages reach a decode described by ``target`` (None: as they are)."""
    if target is None:
        return ""
    notes = []
    if target.fmt != local.fmt:
        notes.append(f"pages converted on send {local.fmt.value} -> {target.fmt.value}")
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


def attach_memha_frame(original, cls, msg):
    """AROUND ``KVArgsRegisterInfo.from_zmq``: SGLang's parse, plus the raw ``MEMHA1`` frame
    (or None) as ``.memha_frame`` and the frames themselves as ``.memha_msg`` (the shared-secret
    tag covers some of them) for ``MemhaKVManager._validate_peer_state_layout``."""
    info = original(cls, msg)
    info.memha_frame = handshake.find_frame(msg)
    info.memha_msg = list(msg)
    return info
