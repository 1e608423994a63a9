"""Send-time conversion: the prefill sends its pages in the *decode's* KV format.

When the handshake finds a sender-side bridge (``kvformat.SENDER_BRIDGES``) between this
prefill's pool and a decode's, ``MemhaKVManager.send_kvcache`` hands that decode's pages to
``Converter.send`` instead of SGLang's memcpy of pool rows:

    prefill pool rows of the chunk's pages  --convert_rows-->  staging rows (decode's format:
        code rows and scale rows, format v4's two buffers)
    staging rows  --Mooncake batch_transfer_sync-->  decode slots of each decode buffer
        (``layout.token_blocks``: buffer base + slot * token bytes)

Staging rows are token-ordered, so the same send serves a decode with another page size
(``REPAGE`` with a format bridge): only the runs of decode slots differ (``repage``).

* ``ENCODE_ON_SEND``: a bf16 pool (SGLang's own, or ours with ``MEMHA_KV_FORMAT=bf16``) is
  quantized with the decode's codec (K rotated first when the decode uses a K transform the
  prefill does not): phase-wise quantization for a prefill that keeps bf16.
* ``REQUANTIZE_ON_SEND``: a pool in another quantized format (ours, e.g. an AMD-style
  ``fp8_e4m3fnuz`` prefill feeding an ``int8`` decode, or SGLang's fp8 pool) is dequantized in
  fp32 (exact: every format's values are fp32 values) and quantized with the decode's codec,
  exactly as ``ENCODE_ON_SEND`` quantizes bf16 rows (the stored K - offset, rotated for the
  decode when only the decode has a K transform). The values are rounded twice: the prefill's
  format's error, then the decode's.
* ``LAYER_TO_TOKEN_SCALE``: an ``fp8_e4m3_tensor`` pool (ours, or SGLang's own fp8 pool: one scale
  per layer, the model's K/V scales) into ``fp8_e4m3``: data bytes kept, every row gets its
  layer's scale as its bf16 scale (``layer_scales``; one bf16 cannot hold is refused at
  registration, ``scale_problem``).

Staging: one byte arena per transfer-worker thread, registered with Mooncake once (re-registered
only when a larger chunk needs it to grow). A chunk is converted and sent a few layer buffers at
a time so the arena stays near one buffer's worth of the largest chunk; the measured bytes
(``MemhaKVManager._transfer_data``) are the decode-format bytes that crossed the wire.

Who calls it: SGLang's prefill transfer worker threads, through ``send_kvcache``, once per chunk
and decode session. Blocks for the conversion and the transfer, like the stock send.
"""
from __future__ import annotations

import functools
import threading

import numpy as np
import torch

from sglang_memha.kvformat import SENDER_BRIDGES, Bridge, FormatDescriptor, get_codec
from sglang_memha.kvformat.fp8 import layer_to_token_scale
from sglang_memha.kvformat.layout import PoolLayout, RowLayout, token_blocks
from sglang_memha.kvformat.transforms import apply_k_transform
ARENA_MIN_BYTES = 16 << 20


def convert_rows(src_rows: torch.Tensor, src: FormatDescriptor, dst: FormatDescriptor, data_out: torch.Tensor,
                 scale_out: torch.Tensor | None, is_key: bool, layer_scale: float = 1.0,
                 src_scales: torch.Tensor | None = None) -> None:
    """Rows of ``src``'s pool -> rows of ``dst``'s pool.

    src_rows:   [n, H, data_bytes(src)] uint8 (a bf16 pool's rows viewed as bytes: [n, H, 2*D]).
    src_scales: [n, H, scale_bytes(src)] uint8, the source pool's scale rows of the same slots;
                None for a format without scale rows (bf16, ``fp8_e4m3_tensor``).
    data_out:   [n, H, data_bytes(dst)] uint8, contiguous (the decode's code rows).
    scale_out:  [n, H, scale_bytes(dst)] uint8, contiguous, or None when ``dst`` has no scale rows.
    layer_scale: the source pool's layer scale (``fp8_e4m3_tensor`` only).
    Raises ValueError for a pair no sender bridge covers (the handshake refuses those first).
    """
    bridge = sender_bridge(src, dst)
    n, h = src_rows.shape[:2]
    if bridge == Bridge.ENCODE_ON_SEND:
        x = src_rows.contiguous().view(torch.bfloat16).reshape(n, h, src.head_dim)
        _encode(x, src, dst, data_out, scale_out, is_key)
    elif bridge == Bridge.REQUANTIZE_ON_SEND:
        _encode(dequantize_rows(src_rows, src_scales, src, layer_scale), src, dst, data_out, scale_out, is_key)
    else:  # Bridge.LAYER_TO_TOKEN_SCALE
        data, scales = layer_to_token_scale(src_rows, layer_scale)
        data_out.copy_(data)
        scale_out.copy_(scales.contiguous().view(torch.uint8).reshape(n, h, -1))


def dequantize_rows(src_rows: torch.Tensor, src_scales: torch.Tensor | None, src: FormatDescriptor,
                    layer_scale: float = 1.0) -> torch.Tensor:
    """Stored rows of ``src``'s format (as ``convert_rows`` takes them) -> [n, H, D] fp32 values
    (exact: code x scale is an fp32 value for every format). K stays as stored (K - offset,
    rotated when ``src`` has a K transform)."""
    codec = get_codec(src.fmt)
    if RowLayout(src.fmt, src.head_dim).has_layer_scale:
        scales = torch.tensor(layer_scale, dtype=torch.float32, device=src_rows.device)
    elif src_scales is None:
        raise ValueError(f"{src.fmt.value} rows need their scale rows to be dequantized")
    else:
        scales = codec.scales_from_bytes(src_scales.contiguous())
    return codec.dequantize(src_rows.contiguous(), scales, torch.float32)


def _encode(x: torch.Tensor, src: FormatDescriptor, dst: FormatDescriptor, data_out: torch.Tensor,
            scale_out: torch.Tensor | None, is_key: bool) -> None:
    """K/V values ``x`` [n, H, D] (bf16 or fp32) -> ``dst``'s rows, as a pool of ``dst``'s format
    writes them (K rotated first when only ``dst`` has a K transform)."""
    if is_key and src.k_transform == "none" and dst.k_transform != "none":
        x = apply_k_transform(dst.k_transform, x)
    codec = get_codec(dst.fmt)
    loc = torch.arange(x.shape[0], device=data_out.device)
    if RowLayout(dst.fmt, dst.head_dim).has_layer_scale:
        codec.quantize_into(x, loc, data_out, None, scale=1.0)
    else:
        codec.quantize_into(x, loc, data_out, scale_out)


@functools.cache
def sender_bridge(src: FormatDescriptor, dst: FormatDescriptor) -> Bridge:
    """The sender-side format bridge from ``src``'s rows to ``dst``'s (judged once per pair:
    every chunk of every request converts 2 x layers buffers; ``REPAGE`` is addressing, not a
    row conversion). ValueError for a pair none covers."""
    bridges = [b for b in dst.check_compatible(src) if b in SENDER_BRIDGES and b != Bridge.REPAGE]
    if not bridges:
        raise ValueError(f"no send-time conversion from {src.fmt.value} to {dst.fmt.value}")
    return bridges[0]


def layer_scales(pool) -> list[tuple[float, float]]:
    """(K, V) scale of each pool layer for ``fp8_e4m3_tensor`` rows: a stock fp8 pool's model
    scales (``pool/stock_pool.record_layer_scales``; a layer without one: 1.0), else our pool's single
    ``layer_scale`` (1.0)."""
    recorded = getattr(pool, "memha_kv_scales", None)
    if recorded is not None:
        return [(1.0, 1.0) if s is None else s for s in recorded]
    s = float(getattr(pool, "layer_scale", torch.ones(1)))
    return [(s, s)] * len(pool.k_buffer)


def scale_problem(pool, bf16_exact: bool = True) -> str | None:
    """Why per-row bf16 scales cannot hold this pool's layer scales exactly, or None. A stock
    pool (no ``layer_scale`` of ours) whose model scales were never read has no known scales.
    ``bf16_exact=False`` (the rows are re-quantized, not given their scale): only that."""
    if getattr(pool, "memha_kv_scales", None) is None and not hasattr(pool, "layer_scale"):
        return ("the model's fp8 K/V scales could not be read at start-up (see the prefill's log), so "
                "its fp8 rows cannot be given their scales; use MEMHA_KV_FORMAT=fp8_e4m3 on the prefill")
    if not bf16_exact:
        return None
    for layer, pair in enumerate(layer_scales(pool)):
        for which, s in zip("KV", pair):
            if not (0 < s < float("inf")) or float(torch.tensor(s).to(torch.bfloat16)) != s:
                return (f"layer {layer} {which} scale {s!r} is not a positive bf16 value, so fp8_e4m3 "
                        f"rows cannot carry it without re-quantizing; use MEMHA_KV_FORMAT=fp8_e4m3 "
                        f"on the prefill")
    return None


class _Arena:
    """A registered staging buffer of one transfer-worker thread."""

    def __init__(self, engine, device: torch.device, nbytes: int):
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.engine = engine
        engine.batch_register([self.buf.data_ptr()], [nbytes])

    def release(self) -> None:
        self.engine.batch_deregister([self.buf.data_ptr()])


class Converter:
    """Per-manager send-time converter; ``send`` is called by transfer-worker threads."""

    def __init__(self, engine, pool, src: FormatDescriptor):
        self.engine, self.pool, self.src = engine, pool, src
        self._tls = threading.local()

    def _arena(self, need: int) -> _Arena:
        arena = getattr(self._tls, "arena", None)
        if arena is None or arena.buf.numel() < need:
            if arena is not None:
                arena.release()
            arena = _Arena(self.engine, self.pool.k_buffer[0].device, max(need, ARENA_MIN_BYTES))
            self._tls.arena = arena
        return arena

    def send(self, transfer, session: str, src_pages: np.ndarray, dst: FormatDescriptor,
             dst_ptrs: list[int], row_runs: np.ndarray, dst_item_len: int) -> int:
        """Convert the K and V rows of ``src_pages`` (prefill page ids, [n] int) of every layer
        into ``dst``'s format, staged back to back (row ``k * P_prefill + j`` = token ``j`` of
        page ``k``), and write them to the decode's buffers ``dst_ptrs`` (its published entries,
        ``PoolLayout`` order) along ``row_runs`` ([r, 3] int: first staged row, first decode slot,
        count; ``repage.token_map(...).staged_rows/dst_slots`` through ``repage.runs``: the
        decode's pages may hold another number of tokens). ``dst_item_len``: bytes of the
        decode's first entry's page (its registration's). ``transfer(session, blocks)`` is the
        manager's ``_transfer_data``. Returns 0, or its non-zero status."""
        page, heads = self.src.page_size, self.src.num_kv_heads
        layout = PoolLayout.of(dst)
        if layout.item_lens()[0] != dst_item_len:
            raise ValueError(f"decode page of {dst.fmt.value} is {dst_item_len} B, expected "
                             f"{dst.page_size} tokens x {heads} heads x {layout.row.data_bytes} B = "
                             f"{layout.item_lens()[0]} B")
        ptrs = layout.split(dst_ptrs)
        src_pages = np.asarray(src_pages, dtype=np.int64)
        n = len(src_pages)
        if n == 0 or len(row_runs) == 0:
            return 0
        dev = self.pool.k_buffer[0].device
        slots = (torch.as_tensor(src_pages, device=dev)[:, None] * page
                 + torch.arange(page, device=dev)).reshape(-1)
        buffers = [(b, side == "k", layer) for side, bufs in (("k", self.pool.k_buffer), ("v", self.pool.v_buffer))
                   for layer, b in enumerate(bufs)]
        data_bytes, scale_bytes = n * page * heads * layout.row.data_bytes, n * page * heads * layout.row.scale_bytes
        chunk_bytes = data_bytes + scale_bytes
        per_round = max(1, ARENA_MIN_BYTES // chunk_bytes)
        arena = self._arena(min(per_round, len(buffers)) * chunk_bytes)
        scales = layer_scales(self.pool)
        scale_rows = getattr(self.pool, "scale_rows", None)  # our pools: per-row scales of a layer
        for start in range(0, len(buffers), per_round):
            blocks = []
            for i, (buf, is_key, layer) in enumerate(buffers[start:start + per_round]):
                side = "k" if is_key else "v"
                base = i * chunk_bytes
                data_out = arena.buf[base:base + data_bytes].view(n * page, heads, layout.row.data_bytes)
                scale_out = None
                if scale_bytes:
                    scale_out = arena.buf[base + data_bytes:base + chunk_bytes].view(n * page, heads,
                                                                                     layout.row.scale_bytes)
                src_scales = None if scale_rows is None else scale_rows(is_key, layer)
                convert_rows(buf[slots].view(torch.uint8).reshape(n * page, heads, -1), self.src, dst,
                             data_out, scale_out, is_key, scales[layer][0 if is_key else 1],
                             None if src_scales is None else src_scales[slots])
                blocks += token_blocks(data_out.data_ptr(), ptrs[(side, "data")][layer],
                                       heads * layout.row.data_bytes, row_runs)
                if scale_out is not None:
                    blocks += token_blocks(scale_out.data_ptr(), ptrs[(side, "scale")][layer],
                                           heads * layout.row.scale_bytes, row_runs)
            if dev.type == "cuda":
                torch.cuda.current_stream(dev).synchronize()
            ret = transfer(session, blocks)
            if ret != 0:
                return ret
        return 0

    def close(self) -> None:
        arena = getattr(self._tls, "arena", None)
        if arena is not None:
            arena.release()


__all__ = ["Converter", "convert_rows", "dequantize_rows", "layer_scales", "scale_problem", "sender_bridge"]
