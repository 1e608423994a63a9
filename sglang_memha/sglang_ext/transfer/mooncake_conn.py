"""SGLang's Mooncake KV manager / receiver with the sglang-memha additions.

Installed by ``kv_hooks.register_metrics`` as HookRegistry REPLACEs of
``sglang.srt.disaggregation.mooncake.conn.Mooncake{KVManager,KVReceiver}``: SGLang sees one
manager class, ``MemhaKVManager``, assembled from one mixin per concern. The bootstrap protocol
(router ``bootstrap_host/port/room``, the bootstrap server's ``/route``, the ZMQ registration and
metadata messages) is SGLang's; we only add to it:

* **Handshake and authentication** (only when ``MEMHA_KV_FORMAT`` is set; ``conn_handshake``):
  the descriptor (and, with a shared secret, HMAC tags) on SGLang's bootstrap messages, checked
  on both sides; a mismatch fails *the request* with the reason, never the server.
* **Measured bytes** (always; ``conn_bytes``): the bytes of every successful Mooncake call,
  per room, KV pages vs the rest, and one ``sglang-memha transfer room=...`` line per room.
* **Send-time bridges** (``conn_bridges``): a decode in another format (``transcode``) or with
  another page size (``repage``) gets its pages converted / re-paged by ``_send_converted``;
  the decode accepts a prefill with another page size in ``try_ensure_parallel_info``
  (``_accept_repaged``).
* **Per-layer pipeline** (``MEMHA_PIPELINE=1``, prefill): pages a per-layer plan already shipped
  during the forward are left out of SGLang's send (``send_kvcache``; ``pipeline``).
* **Different attention TP** (``head_slice``): a memha decode with another attention TP size
  gets this rank's heads of each page, every data and scale buffer sliced with its own row
  bytes (``send_kvcache_slice``, which SGLang calls for such a pair).

Here: the manager's state (``__init__``), the send entry points that route a chunk to the
pipeline, the bridges, the head slicing or SGLang's own send, the room's conclusion, and the receiver's
per-request checks and the bytes it expects (``memha_arrived_bytes``, for
``sglang_ext/metrics``). The sender is not replaced here: ``cpu/cpu_compat`` owns that REPLACE (one
owner per target).

All methods run in SGLang's threads (scheduler, bootstrap thread, transfer workers); none blocks
beyond what the overridden SGLang method already does.
"""
from __future__ import annotations

import logging
from http import HTTPStatus

import numpy as np

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.mooncake import conn as mc
from sglang.srt.disaggregation.utils import DisaggregationMode

from sglang_memha.config import load_config
from sglang_memha.sglang_ext import metrics, state
from sglang_memha.sglang_ext.transfer import handshake
from sglang_memha.sglang_ext.transfer.conn_bridges import BridgeMixin
from sglang_memha.sglang_ext.transfer.conn_bytes import ByteAccountingMixin
from sglang_memha.sglang_ext.transfer.conn_handshake import HandshakeMixin
from sglang_memha.sglang_ext.transfer.head_slice import HeadSliceMixin
from sglang_memha.sglang_ext.transfer.pipeline import LayerPipeline

logger = logging.getLogger("sglang_memha")


class MemhaKVManager(HandshakeMixin, BridgeMixin, HeadSliceMixin, ByteAccountingMixin, mc.MooncakeKVManager):
    # SGLang's manager, for calling its methods on a probe (``_accept_repaged``); once the REPLACE
    # is applied, ``mc.MooncakeKVManager`` names this class.
    memha_sglang_cls = mc.MooncakeKVManager
    # A prefill's Failed status carries its reason to the decode (and so to the client), as
    # SGLang's NIXL and Mori managers do; Mooncake's sends none, so the decode reported "it might
    # be dead" for a request refused on purpose. The frame is optional on parse: a stock peer
    # on either side still reads these messages.
    kv_status_msg_carries_reason = True

    def __init__(self, args, disaggregation_mode, server_args, is_mla_backend=False):
        self._init_room_stats()
        self.memha_desc = state.local_descriptor()  # None: the quantized-KV path is off
        # SGLang's own pool, described: a prefill's for memha decodes (stock for the others), an
        # fp8 decode's for memha fp8_e4m3_tensor prefills (``pool/stock_pool``)
        self.memha_stock = state.local_is_stock()
        self.memha_bridges: dict[int, list] = {}  # decode: room -> bridges to apply on arrival
        # prefill: decode session -> its descriptor, when pages must be converted on send
        self.memha_send_targets: dict[str, object] = {}
        # prefill: decode session with another attention TP size -> its PoolLayout (head_slice)
        self.memha_sliced: dict[str, object] = {}
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

    def send_kvcache(self, mooncake_session_id, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices,
                     *args, **kwargs):
        """Transfer worker, once per chunk and decode session; blocks for the transfer. With the
        pipeline on, pages a per-layer plan already shipped are waited for and left out
        (``LayerPipeline.claim``). A decode session with a send target (another format or page
        size) goes to ``_send_converted``; the pipeline never plans those."""
        if self._refuse_nonfinite(prefill_kv_indices):
            return 0  # the room failed with its reason; the session stays healthy
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

    def send_kvcache_slice(self, mooncake_session_id, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices,
                           dst_tp_rank, dst_attn_tp_size, *args, **kwargs):
        """Transfer worker, once per chunk and decode session whose attention TP size differs
        from this prefill's (SGLang routes those here; the pipeline never plans them); blocks for
        the transfer. A memha decode registered for head slicing gets this rank's heads of every
        entry (``_send_head_sliced``); a stock pair keeps SGLang's slicing (its bytes are not
        counted: SGLang's calls Mooncake directly)."""
        if self._refuse_nonfinite(prefill_kv_indices):
            return 0
        stats = self._room_stats()
        if stats is not None:
            stats.pages += len(prefill_kv_indices)
        dst = self.memha_sliced.get(mooncake_session_id)
        self._memha_tls.phase = "kv"
        try:
            if dst is not None:
                return self._send_head_sliced(mooncake_session_id, prefill_kv_indices, dst_kv_ptrs,
                                              dst_kv_indices, int(dst_tp_rank), int(dst_attn_tp_size), dst)
            return super().send_kvcache_slice(mooncake_session_id, prefill_kv_indices, dst_kv_ptrs,
                                              dst_kv_indices, dst_tp_rank, dst_attn_tp_size, *args, **kwargs)
        finally:
            self._memha_tls.phase = None

    def _refuse_nonfinite(self, prefill_kv_indices) -> bool:
        """Transfer worker: fail this chunk's room if its pages hold K/V that was non-finite when
        the forward wrote it (``MemhaQuantKVPool.nonfinite_layers``). Returns True when refused:
        nothing is sent, SGLang's Failed path tells the decode, and both sides free the pages."""
        pool = state.local_pool() if self.memha_desc is not None else None
        layers = pool.nonfinite_layers(prefill_kv_indices) if hasattr(pool, "nonfinite_layers") else []
        if not layers:
            return False
        room = self._memha_tls.room
        reason = (f"sglang-memha: {NONFINITE_TEXT} (NaN, inf or |x| > 2^64) for this "
                  f"request in layer(s) {layers[:8]}{' ...' if len(layers) > 8 else ''}; its KV is not sent "
                  f"and the request fails (other requests are unaffected)")
        logger.error("sglang-memha: room %s: %s", room, reason)
        self.conclude_failure(bootstrap_room=room, failure_reason=reason)
        return True

    def conclude_transfer(self, *, bootstrap_room, status, targets=None, failure_reason=None):
        emitted = super().conclude_transfer(bootstrap_room=bootstrap_room, status=status,
                                            targets=targets, failure_reason=failure_reason)
        if emitted in (KVPoll.Success, KVPoll.Failed):
            if self.memha_pipeline is not None:
                self.memha_pipeline.forget(bootstrap_room)
            self._log_room(bootstrap_room, "ok" if emitted == KVPoll.Success else "failed")
        self._sweep_rooms()
        return emitted

    def _maybe_ack_drained_abort(self, room: int) -> None:
        """SGLang (transfer worker, bootstrap thread, sender ``clear``) acks a decode's abort of
        ``room`` once the room's chunks drained, and the decode then reuses its pages. Layers the
        pipeline still has on the wire count as undrained: the pipeline calls this again when
        the room's last plan is done."""
        if self.memha_pipeline is not None and self.memha_pipeline.in_flight(room):
            return
        super()._maybe_ack_drained_abort(room)


NONFINITE_TEXT = "the model produced non-finite K/V"


def abort_status_of_request_faults(original_fn, req, error_message, status_code=None):
    """AROUND ``prepare_abort`` as ``sglang.srt.disaggregation.{prefill,decode}`` call it (scheduler,
    when a request's KV transfer failed; does not block). SGLang answers every failed transfer
    with 500. The router retries a 500 (5 more times by default, each a new prefill) and counts it
    against both workers' circuit breakers (10 failures open them for 60 s). A request whose KV
    is non-finite fails the same way on every try, so a couple of such prompts would take a
    healthy prefill out of rotation for everyone. It gets 400, as SGLang's other faults of the
    request itself (a prompt too long for the pool): the router neither retries a 4xx nor counts
    it as the worker's failure, and 400 is the one 4xx its PD path passes on from a decode
    (sglang_router 0.3.2 turns a decode's 422 into 500). Other transfer failures keep 500."""
    if NONFINITE_TEXT in str(error_message):
        status_code = HTTPStatus.BAD_REQUEST
    return original_fn(req, error_message, status_code=status_code)


class MemhaKVReceiver(mc.MooncakeKVReceiver):
    def init(self, prefill_dp_rank: int):
        """Decode scheduler, once per request before allocation: SGLang's init, then the
        descriptor check against the prefill's published layout."""
        super().init(prefill_dp_rank)
        local = self.kv_mgr.memha_desc if isinstance(self.kv_mgr, MemhaKVManager) else None
        if local is None or self.conclude_state == KVPoll.Failed:
            return
        info = self.kv_mgr.prefill_info_table.get(self.bootstrap_addr)
        tp = (self.kv_mgr.attn_tp_size, getattr(info, "attn_tp_size", self.kv_mgr.attn_tp_size))
        stock = getattr(self.kv_mgr, "memha_stock", False)
        reason = handshake.check_prefill_peer(local, getattr(info, "kv_layout", None), peer=self.bootstrap_addr,
                                              secret=self.kv_mgr.memha_secret, tp=tp, local_stock=stock)
        if reason is None and stock:
            return  # SGLang's own fp8 pool: the pages land as they are (no bridge)
        if reason is None:
            bridges = handshake.bridges_for(local, info.kv_layout, tp)
            if bridges:
                self.kv_mgr.memha_bridges[self.bootstrap_room] = bridges
                # the bytes cross in the prefill's format and are converted here on arrival
                self.memha_wire_fmt = handshake.layout_descriptor(info.kv_layout).fmt.value
            return
        logger.error("sglang-memha: room %s: %s", self.bootstrap_room, reason)
        metrics.handshake_refused(reason.kind)
        self.kv_mgr.record_failure(self.bootstrap_room, reason)
        self.kv_mgr.update_status(self.bootstrap_room, KVPoll.Failed)
        self.conclude_state = KVPoll.Failed
        # Tell the prefill ranks, which would otherwise wait for this request's metadata.
        self.ensure_abort_notified()

    def send_metadata(self, kv_indices, *args, **kwargs):
        """Decode scheduler, once per request: SGLang's, keeping how many pages the prefill is
        asked to fill and the prefix it skips (``memha_arrived_bytes``)."""
        self.memha_dst_pages = len(kv_indices)
        self.memha_prefix_len = int(kwargs.get("decode_prefix_len") or 0)
        return super().send_metadata(kv_indices, *args, **kwargs)

    def memha_arrived_bytes(self, prompt_tokens: int) -> int | None:
        """Bytes the prefill wrote into this decode's KV buffers for the request (the received
        metric; Mooncake tells the receiver no byte count): the pages it was asked to fill, whole,
        or for a prefill with another page size (which writes token rows, ``repage``) the
        prompt's rows after the prefix. None before ``send_metadata``."""
        pages = getattr(self, "memha_dst_pages", None)
        if pages is None:
            return None
        args = self.kv_mgr.kv_args
        page_bytes = sum(int(n) for n in args.kv_item_lens)
        info = self.kv_mgr.prefill_info_table.get(self.bootstrap_addr)
        if (getattr(info, "page_size", None) or args.page_size) == args.page_size:
            return pages * page_bytes
        return (prompt_tokens - self.memha_prefix_len) * page_bytes // args.page_size

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
