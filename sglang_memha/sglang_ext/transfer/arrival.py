"""The decode's arrival step: once a request's KV is in the pool, check it and make it readable.

``land_on_arrival`` is a HookRegistry AFTER on ``DecodeTransferQueue._commit_transfer_to_req``,
registered by ``kv_hooks.register_kv_format`` (decode scheduler, once per request whose transfer
succeeded, before the request is queued for decoding). In order: the KV checksum
(``integrity.verify_on_arrival``, when ``--disaggregation-enable-kv-checksum`` is on), the
bridges the handshake chose for this request (fnuz <-> fn in place, ``MemhaKVReceiver.init``),
then, in the eager ablation, dequantization into the bf16 buffers (``pool/eager_pool``).

``count_arrived``, BEFORE the same SGLang method for every PD decode (``kv_hooks.register_metrics``),
adds the request's bytes to the received-bytes metric (``sglang_ext/metrics``) when metrics are on.
"""
from __future__ import annotations

import logging

from sglang_memha.sglang_ext import metrics

logger = logging.getLogger("sglang_memha")


def land_on_arrival(result, queue, decode_req, *args, **kwargs):
    """AFTER ``DecodeTransferQueue._commit_transfer_to_req`` (decode scheduler, once per request
    whose KV arrived): verify the KV checksum when it is on (``integrity.verify_on_arrival``),
    apply the handshake's bridges (fnuz <-> fn) to the prompt's rows, then, in the eager
    ablation, dequantize them into the bf16 buffers. A checksum mismatch or a bridge that refuses
    the bytes (NaN codes) aborts the request with the reason; the caller then frees its pages."""
    from sglang.srt.disaggregation.utils import prepare_abort
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    from sglang_memha.sglang_ext.pool.eager_pool import MemhaEagerKVPool
    from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool

    req = decode_req.req
    pool = queue.scheduler.token_to_kv_pool_allocator.get_kvcache()
    mgr = queue.scheduler.disagg_decode_prealloc_queue.kv_manager
    bridges = getattr(mgr, "memha_bridges", {}).pop(req.bootstrap_room, [])
    if (isinstance(req.finished_reason, FINISH_ABORT) or not isinstance(pool, MemhaQuantKVPool)
            or req.kv.req_pool_idx is None):
        return result
    slots = queue.scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :len(req.origin_input_ids)].long()
    from sglang_memha.sglang_ext.transfer import integrity

    mismatch = integrity.verify_on_arrival(queue.scheduler, req)
    if mismatch is not None:  # the wire's bytes, before any bridge rewrites them
        logger.error("sglang-memha: %s", mismatch)
        prepare_abort(req, "KV checksum mismatch", status_code=500)
        return result
    try:
        for bridge in bridges:
            pool.apply_bridge(slots, bridge)
    except ValueError as e:
        logger.error("sglang-memha: room %s: bridge failed: %s", req.bootstrap_room, e)
        prepare_abort(req, f"sglang-memha: KV bridge {bridges} refused the prefill's bytes: {e}",
                      status_code=500)
        return result
    if isinstance(pool, MemhaEagerKVPool):
        pool.land(slots)
    return result


def count_arrived(queue, decode_req, *args, **kwargs):
    """BEFORE ``DecodeTransferQueue._commit_transfer_to_req`` (decode scheduler, once per request
    whose transfer SGLang polled as done; BEFORE, as the method drops the request's receiver on
    its way out): the received-bytes metric. With metrics off it returns at once; fake transfers
    (SGLang's warm-up) have no memha receiver and are not counted. The bytes count even when the
    request then fails its checksum or its metadata check: they crossed the wire."""
    if not metrics.enabled():
        return None
    receiver = decode_req.kv_receiver
    arrived = getattr(receiver, "memha_arrived_bytes", None)
    nbytes = None if arrived is None else arrived(len(decode_req.req.origin_input_ids))
    if nbytes is not None:
        mgr = receiver.kv_mgr
        fmt = getattr(receiver, "memha_wire_fmt", None) or metrics.format_label(mgr.memha_desc, mgr.memha_stock)
        metrics.kv_received(fmt, nbytes)
    return None  # SGLang's method runs with its arguments unchanged
