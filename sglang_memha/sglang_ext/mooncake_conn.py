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
from sglang_memha.sglang_ext import handshake, state
from sglang_memha.sglang_ext.pipeline import LayerPipeline

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
    """Wraps a transfer worker's queue so the worker thread knows which room it serves."""

    def __init__(self, queue, tls: threading.local):
        self._queue, self._tls = queue, tls

    def get(self, *args, **kwargs):
        chunk = self._queue.get(*args, **kwargs)
        self._tls.room = getattr(chunk, "room", None)
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
            from sglang_memha.sglang_ext.transcode import Converter

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
                logger.warning("sglang-memha: decode at %s registered: session %s%s", peer, session,
                               "" if target is None else
                               f"; pages converted on send {self.memha_desc.fmt.value} -> {target.fmt.value}")
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
        """Transfer worker, once per chunk and decode session. With the pipeline on, pages a
        per-layer plan already shipped are waited for and left out (``LayerPipeline.claim``)."""
        stats = self._room_stats()
        if stats is not None:
            asked = len(prefill_kv_indices)
            stats.pages += asked
            if self.memha_pipeline is not None:
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
            target = self.memha_send_targets.get(mooncake_session_id)
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
        """Pages for a decode whose format the handshake bridged on the sender side
        (``transcode``); the registration was checked for it (``_conversion_problem``)."""
        _, _, dst_k, dst_v, _ = self.get_mha_kv_ptrs_with_pp(self.kv_args.kv_data_ptrs, dst_kv_ptrs)
        return self.memha_converter.send(self._transfer_data, session, prefill_kv_indices, target,
                                         dst_k, dst_v, dst_kv_indices, int(dst_item_len))

    def _conversion_problem(self, registration_info, target) -> str | None:
        """Prefill, bootstrap thread: why pages cannot be converted for this decode, or None."""
        from sglang_memha.sglang_ext.transcode import row_bytes

        layers = self.memha_desc.num_layers
        want = self.memha_desc.page_size * self.memha_desc.num_kv_heads * row_bytes(target)
        if self.pp_size != 1 or len(registration_info.dst_kv_ptrs) != 2 * layers:
            return (f"send-time KV conversion ({self.memha_desc.fmt.value} -> {target.fmt.value}) supports "
                    f"one pipeline stage and plain MHA KV registrations only; use the same MEMHA_KV_FORMAT "
                    f"on both servers")
        if registration_info.dst_kv_item_len != want:
            return (f"decode registered {registration_info.dst_kv_item_len} B per {target.fmt.value} page, "
                    f"expected {want}; use the same MEMHA_KV_FORMAT on both servers")
        if self.memha_desc.fmt == KVFormat.FP8_E4M3_TENSOR:
            from sglang_memha.sglang_ext.transcode import scale_problem

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
        ends the decode scheduler (the whole server) over one misconfigured prefill. Here the
        reason is kept and the address reported not ready: SGLang retries, then aborts that
        prefill's requests (``MemhaKVReceiver.abort`` gives them the reason); the server and
        requests from other prefills go on."""
        try:
            ready = super().try_ensure_parallel_info(bootstrap_addr)
            self.memha_refused_prefills.pop(bootstrap_addr, None)  # fixed and restarted
            return ready
        except RuntimeError as e:
            self.memha_refused_prefills[bootstrap_addr] = f"prefill at {bootstrap_addr} refused: {e}"
            logger.error("sglang-memha: prefill at %s refused (its requests fail, this server goes on): %s",
                         bootstrap_addr, e)
            return False


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


def attach_memha_frame(original, cls, msg):
    """AROUND ``KVArgsRegisterInfo.from_zmq``: SGLang's parse, plus the raw ``MEMHA1`` frame
    (or None) as ``.memha_frame`` and the frames themselves as ``.memha_msg`` (the shared-secret
    tag covers some of them) for ``MemhaKVManager._validate_peer_state_layout``."""
    info = original(cls, msg)
    info.memha_frame = handshake.find_frame(msg)
    info.memha_msg = list(msg)
    return info
