"""KV integrity check on the wire, built on SGLang's own ``--disaggregation-enable-kv-checksum``.

SGLang 0.5.23 already carries the protocol: the prefill digests the pages it sends
(``KvChecksumComputer.compute``, after the last chunk's forward) and ships the digest in the
request's aux metadata with a *layout signature*; the decode digests the same pages of its own
pool when the request enters its first batch, and on a mismatch aborts the request ("KV checksum
mismatch", HTTP 500) and frees its pages, before any token is computed from that KV. On the
quantized path the decode checks earlier: on arrival, before the request is queued as ready
(``verify_on_arrival``, attention TP 1). Two gaps on our path, closed here (HookRegistry, both
servers):

| target (``sglang.srt.disaggregation.`` ...) | type | why |
|---|---|---|
| ``checksum.KvChecksumComputer.compute`` | AROUND | SGLang's digest is a CUDA kernel; CPU page indices get a CRC-32 over every layer's K and V page rows (quantized data with their scales: the raw bytes that crossed the wire), chained layer by layer. CUDA indices keep SGLang's kernel |
| ``prefill.PrefillBootstrapQueue.__init__``, ``decode.DecodePreallocQueue.__init__`` | AFTER | the layout signature covers ``kv_args.kv_layout``, which only our prefill sets (its format descriptor): both sides now sign ``memha_signature`` (page geometry + descriptor), so equal formats compare; different ones (a bridged fnuz -> fn pair, pages converted on send, the eager ablation's pool) are logged once by SGLang and admitted unverified |

Cost: one gather + CRC per layer buffer per request on each side (zlib's CRC-32, GB/s). Tests
corrupt a request's arrived KV from outside, with a test-only plugin that hooks
``verify_on_arrival`` in the decode (``sglang_memha.testing.kv_corruption``).
"""
from __future__ import annotations

import ctypes
import zlib
from types import SimpleNamespace

import numpy as np

from sglang_memha.sglang_ext import metrics


def crc_pages(ptrs: list[int], item_lens: list[int], pages: np.ndarray) -> int:
    """CRC-32 of rows ``pages`` of each buffer (``ptrs[i]``: base address, ``item_lens[i]``:
    bytes per page), buffers in order; returned + 1 so it is never 0 (SGLang's "no digest")."""
    crc = 0
    if len(pages):
        rows_needed = int(pages.max()) + 1
        for ptr, item in zip(ptrs, item_lens):
            buf = np.ctypeslib.as_array((ctypes.c_uint8 * (rows_needed * item)).from_address(ptr))
            crc = zlib.crc32(np.ascontiguousarray(buf.reshape(rows_needed, item)[pages]), crc)
    return crc + 1


def compute(original, self, kv_page_indices, state_indices=None):
    """AROUND ``KvChecksumComputer.compute`` (prefill scheduler after the last chunk, decode
    scheduler at batch entry; blocking, ~ms per request)."""
    if kv_page_indices.is_cuda:
        return original(self, kv_page_indices, state_indices)
    if self._state_data_ptrs:
        raise NotImplementedError("sglang-memha CPU KV checksum covers KV pages only "
                                  "(no mamba/SWA state buffers); drop --disaggregation-enable-kv-checksum")
    pages = kv_page_indices.to("cpu").numpy().astype(np.int64)
    return crc_pages(self._kv_data_ptrs, self._kv_item_lens, pages)


def memha_signature(kv_args, layout: str) -> int:
    """SGLang's ``kv_layout_signature`` with ``kv_layout`` = our descriptor's layout string."""
    from sglang.srt.disaggregation.utils import kv_layout_signature

    view = SimpleNamespace(**{k: getattr(kv_args, k) for k in (
        "page_size", "kv_cache_dtype_str", "swa_kv_cache_layout", "state_types", "kv_item_lens",
        "state_item_lens")}, kv_layout=layout)
    return kv_layout_signature(view)


def align_signature(result, queue, *args, **kwargs):
    """AFTER ``PrefillBootstrapQueue.__init__`` / ``DecodePreallocQueue.__init__`` (scheduler
    start-up): sign the memha layout on both sides when the checksum is on."""
    from sglang_memha.sglang_ext import state
    from sglang_memha.sglang_ext.transfer import handshake

    desc = state.local_descriptor()
    # A described stock pool keeps SGLang's signature: its stock decodes still verify.
    if getattr(queue, "kv_checksum_signature", 0) and desc is not None and not state.local_is_stock():
        queue.kv_checksum_signature = memha_signature(queue.kv_manager.kv_args,
                                                      handshake.encode_layout(desc))
    return result


def verify_on_arrival(scheduler, req) -> str | None:
    """Decode scheduler, from ``arrival.land_on_arrival`` (AFTER ``_commit_transfer_to_req``,
    once per request whose KV arrived, before bridges touch the rows and before the request is
    queued as ready). Digests the request's arrived pages and compares with the prefill's digest;
    returns the mismatch message (the caller aborts the request, SGLang frees its pages) or
    None. Marks the request verified, so SGLang's own check at batch entry does not repeat it.
    With attention TP > 1 the check stays at SGLang's batch entry, where the ranks agree on
    what to drop (a per-rank abort here could split the ranks' batches). Blocking, ~ms."""
    from sglang.srt.disaggregation.checksum import page_indices_for_request
    from sglang.srt.disaggregation.decode import _bootstrap_addr

    computer = getattr(scheduler, "kv_checksum_computer", None)
    expected = getattr(req, "expected_kv_checksum", 0)
    if computer is None or not expected or getattr(scheduler, "attn_tp_size", 1) != 1:
        return None
    kv_manager = scheduler.disagg_decode_prealloc_queue.kv_manager
    if not kv_manager.should_verify_kv_checksum(_bootstrap_addr(req)):
        return None
    req.expected_kv_checksum = 0
    pages = page_indices_for_request(scheduler, req, len(req.origin_input_ids),
                                     start_idx=req.kv.cache_protected_len)
    actual = computer.compute(pages, None)
    if actual == expected:
        return None
    metrics.checksum_failed()
    return (f"KV checksum mismatch req={req.rid} bootstrap_room={req.bootstrap_room} "
            f"expected={expected:#x} got={actual:#x} (detected on arrival, before decoding)")


def count_batch_entry_failure(scheduler, req, msg, *args, **kwargs):
    """BEFORE ``SchedulerDisaggregationDecodeMixin._handle_kv_checksum_mismatch`` (decode
    scheduler, once per request SGLang's own batch-entry check found corrupted: attention TP > 1,
    or a stock pool): the checksum-failure metric, as ``verify_on_arrival`` counts its own."""
    metrics.checksum_failed()


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    d = "sglang.srt.disaggregation"
    HookRegistry.register(f"{d}.decode.SchedulerDisaggregationDecodeMixin._handle_kv_checksum_mismatch",
                          count_batch_entry_failure, HookType.BEFORE)
    HookRegistry.register(f"{d}.checksum.KvChecksumComputer.compute", compute, HookType.AROUND)
    HookRegistry.register(f"{d}.prefill.PrefillBootstrapQueue.__init__", align_signature, HookType.AFTER)
    HookRegistry.register(f"{d}.decode.DecodePreallocQueue.__init__", align_signature, HookType.AFTER)
