"""Triton kernels: quantize-on-write into pool slots, and dequantize a gather of pages.

Same bytes as the torch codecs (bit-exact quantize; dequantize equal up to fp32 FMA contraction
in int4's ``q * scale + min``). Every rounding is also written out in integer arithmetic, so the
kernels run under TRITON_INTERPRET=1 and on GPUs without fp8 instructions; on sm_89+ fp8 uses the
hardware e4m3fn conversions and rounding uses cvt.rni instead (``hw``; the integer fp8 encoder
costs ~30 ALU ops per element, which made the kernel compute-bound at ~0.57 of copy bandwidth on
an H200).

Launchers check shapes, dtypes and devices first. Triton is imported lazily: this module can be
imported without it, and the launchers raise ``RuntimeError`` when it is missing.

    x          [num_tokens, num_kv_heads, head_dim]               bf16 | fp16 | fp32
    loc        [num_tokens]                                       int64 slot indices
    data_pool  [num_slots, num_kv_heads, data_bytes_per_head]     uint8
    scale_pool [num_slots, num_kv_heads, scale_bytes_per_head]    uint8 (companion rows)
    page_ids   [num_pages]                                        int32 | int64
    out        [num_pages * page_size, num_kv_heads, head_dim]    bf16 | fp16 | fp32

Formats: fp8_e4m3, fp8_e4m3fnuz, int8, int4_g32, int4_g64, bfp8. bf16 and fp8_e4m3_tensor are
plain casts; ``codec.quantize_into`` / ``codec.gather_dequantize`` cover them on any device.
int4_kivi's K has its own pair at the end (``kivi_quantize_blocks``: whole or partly filled
32-token blocks, one program per (block, head); ``kivi_dequantize_pages``), which int4_kivi_g64's
K shares; their V is int4_g32 / int4_g64 (the kernels above).
"""

from __future__ import annotations

import functools
import os
import struct

import torch

from sglang_memha.kvformat.base import get_codec
from sglang_memha.kvformat.spec import KVFormat, format_spec

TRITON_FORMATS = (
    KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ, KVFormat.INT8,
    KVFormat.INT4_G32, KVFormat.INT4_G64, KVFormat.BFP8,
)
# (token, head) rows per program. One row is 64-256 B of bf16: one program per row leaves the GPU
# launch-bound, so a program takes a tile of rows (measured choice: eval/bench_codecs.py --gpu-only
# sweeps it and records the best)
ROWS_PER_PROGRAM = 16
# kernel MODE per format: 0 fp8 fn, 1 fp8 fnuz, 2 int8, 3 int4, 4 bfp8
_MODE = {
    KVFormat.FP8_E4M3: 0, KVFormat.FP8_E4M3FNUZ: 1, KVFormat.INT8: 2,
    KVFormat.INT4_G32: 3, KVFormat.INT4_G64: 3, KVFormat.BFP8: 4,
}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _jit():
    try:
        import triton

        from sglang_memha.kvformat import _triton_jit as j
    except ImportError as e:
        raise RuntimeError("sglang_memha.kvformat.triton_kernels needs the `triton` package") from e
    return triton, j


def _kernels():
    triton, j = _jit()
    return (triton, j._quant_row_kernel, j._quant_int4_kernel, j._quant_bfp8_kernel, j._dequant_kernel,
            j._dequant_int4_kernel)


def _scale_view(fmt: KVFormat, scale_pool: torch.Tensor) -> torch.Tensor:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16x2": torch.bfloat16,
             "e8m0": torch.uint8}[format_spec(fmt).scale_dtype]
    return scale_pool.view(dtype)


def _check_pools(fmt: KVFormat, head_dim: int, data_pool: torch.Tensor, scale_pool: torch.Tensor) -> None:
    spec = format_spec(fmt)
    for name, pool, per_head in (
        ("data_pool", data_pool, spec.data_bytes_per_head(head_dim)),
        ("scale_pool", scale_pool, spec.scale_bytes_per_head(head_dim)),
    ):
        if pool.dtype != torch.uint8 or pool.dim() != 3 or pool.shape[2] != per_head or not pool.is_contiguous():
            raise ValueError(
                f"{name}={tuple(pool.shape)} {pool.dtype}: expected contiguous uint8 "
                f"[num_slots, num_kv_heads, {per_head}] for {fmt.value} head_dim={head_dim}"
            )
    if data_pool.shape[:2] != scale_pool.shape[:2]:
        raise ValueError(f"data_pool {tuple(data_pool.shape)} and scale_pool {tuple(scale_pool.shape)} differ in slots/heads")


@functools.cache
def _sm89(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def _hw(device: torch.device, hw: bool | None) -> bool:
    """Use the GPU's own instructions (e4m3fn conversions, sm_89+; cvt.rni rounding) instead of
    the integer-arithmetic versions? Same bytes either way (GPU tests check both); None: wherever
    available."""
    if os.environ.get("TRITON_INTERPRET") == "1" or device.type != "cuda":
        return False
    ok = _sm89(device.index if device.index is not None else torch.cuda.current_device())
    if hw and not ok:
        raise ValueError(f"hw=True: {torch.cuda.get_device_name(device)} has no fp8 conversion instructions (sm_89+)")
    return ok if hw is None else bool(hw)


def _check_rows(rows_per_program: int) -> None:
    if not isinstance(rows_per_program, int) or rows_per_program < 1 or rows_per_program & (rows_per_program - 1):
        raise ValueError(f"rows_per_program={rows_per_program!r}: expected a power of two >= 1")


def quantize_to_slots(
    fmt: str | KVFormat, x: torch.Tensor, loc: torch.Tensor, data_pool: torch.Tensor, scale_pool: torch.Tensor,
    rows_per_program: int = ROWS_PER_PROGRAM, num_warps: int = 4, hw: bool | None = None,
) -> None:
    """Triton quantize-on-write; same result as ``get_codec(fmt).quantize_into`` (no finiteness
    check on GPU: callers validate upstream or accept saturation of +-inf; NaN is undefined).
    ``rows_per_program``, ``num_warps``: launch shape (tuning knobs, not results); ``hw``: the
    GPU's fp8 conversion and rounding instructions (None: where available; ``_hw``)."""
    fmt = KVFormat.parse(fmt)
    if fmt not in TRITON_FORMATS:
        raise ValueError(f"fmt={fmt.value}: Triton kernels cover {[f.value for f in TRITON_FORMATS]}")
    triton, k_row, k_int4, k_bfp8, _, _ = _kernels()
    if x.dim() != 3 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32) or x.stride(-1) != 1:
        raise ValueError(f"x={tuple(x.shape)} {x.dtype}: expected [T, H, D] bf16/fp16/fp32, last dim contiguous")
    t, h, d = x.shape
    format_spec(fmt).check_head_dim(d)
    _check_pools(fmt, d, data_pool, scale_pool)
    if loc.shape != (t,) or loc.dtype != torch.int64:
        raise ValueError(f"loc={tuple(loc.shape)} {loc.dtype}: expected [{t}] int64")
    if data_pool.shape[1] != h:
        raise ValueError(f"data_pool has {data_pool.shape[1]} kv heads, x has {h}")
    devs = {x.device, loc.device, data_pool.device, scale_pool.device}
    if len(devs) != 1:
        raise ValueError(f"x, loc, data_pool, scale_pool must share one device, got {devs}")
    _check_rows(rows_per_program)
    if t == 0:
        return
    sv = _scale_view(fmt, scale_pool)
    args = (x, loc, data_pool, sv, t * h, x.stride(0), x.stride(1), data_pool.stride(0), data_pool.stride(1),
            sv.stride(0), sv.stride(1))
    grid = (triton.cdiv(t * h, rows_per_program),)
    common = {"H": h, "ROWS": rows_per_program, "num_warps": num_warps, "HW": _hw(x.device, hw)}
    mode = _MODE[fmt]
    if mode in (0, 1, 2):
        # fp8: bf16 scale rule of the codec (fp8.fp8_row_scale); int8: fp32 amax / 127
        qmax, s_min = (127.0, 0.0) if mode == 2 else (get_codec(fmt).clamp, get_codec(fmt).s_min)
        smin_bits = struct.unpack("<i", struct.pack("<f", s_min))[0]
        k_row[grid](*args, D=d, BLOCK_D=triton.next_power_of_2(d), MODE=mode, QMAX=qmax, SMIN_BITS=smin_bits, **common)
    elif mode == 3:
        gs = format_spec(fmt).group_size
        k_int4[grid](*args, NG=d // gs, NG_P2=triton.next_power_of_2(d // gs), GS=gs, **common)
    else:
        k_bfp8[grid](*args, NB=d // 16, NB_P2=triton.next_power_of_2(d // 16), **common)


def dequantize_pages(
    fmt: str | KVFormat,
    data_pool: torch.Tensor,
    scale_pool: torch.Tensor,
    page_ids: torch.Tensor,
    page_size: int,
    head_dim: int,
    out_dtype: torch.dtype = torch.bfloat16,
    rows_per_program: int = ROWS_PER_PROGRAM,
    num_warps: int = 4,
    hw: bool | None = None,
) -> torch.Tensor:
    """Triton gather + dequantize of whole pages -> [len(page_ids) * page_size, H, head_dim]."""
    fmt = KVFormat.parse(fmt)
    if fmt not in TRITON_FORMATS:
        raise ValueError(f"fmt={fmt.value}: Triton kernels cover {[f.value for f in TRITON_FORMATS]}")
    triton, _, _, _, k_deq, k_deq_int4 = _kernels()
    _check_pools(fmt, head_dim, data_pool, scale_pool)
    if page_ids.dim() != 1 or page_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_ids={tuple(page_ids.shape)} {page_ids.dtype}: expected 1-D int32/int64")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype={out_dtype}: expected bf16, fp16 or fp32")
    if not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size={page_size!r}: expected a positive int")
    _check_rows(rows_per_program)
    n = page_ids.numel() * page_size
    h = data_pool.shape[1]
    out = torch.empty((n, h, head_dim), dtype=out_dtype, device=data_pool.device)
    if n == 0:
        return out
    sv = _scale_view(fmt, scale_pool)
    gs = format_spec(fmt).group_size or 1
    grid = (triton.cdiv(n * h, rows_per_program),)
    if _MODE[fmt] == 3:
        k_deq_int4[grid](
            data_pool, sv, page_ids, out, n * h,
            data_pool.stride(0), data_pool.stride(1), sv.stride(0), sv.stride(1), out.stride(0), out.stride(1),
            H=h, PAGE=page_size, NG=head_dim // gs, NG_P2=triton.next_power_of_2(head_dim // gs), GS=gs,
            ROWS=rows_per_program, num_warps=num_warps,
        )
        return out
    k_deq[grid](
        data_pool, sv, page_ids, out, n * h,
        data_pool.stride(0), data_pool.stride(1), sv.stride(0), sv.stride(1), out.stride(0), out.stride(1),
        H=h, PAGE=page_size, D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), MODE=_MODE[fmt], GS=gs,
        ROWS=rows_per_program, HW=_hw(data_pool.device, hw), num_warps=num_warps,
    )
    return out


# ---- int4_kivi(_g64): K per channel over 32-token blocks (V int4_g32 / g64: the kernels above) ----
def kivi_quantize_blocks(blocks: torch.Tensor, fill: torch.Tensor, num_warps: int = 4,
                         hw: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``Int4KiviKCodec.quantize_blocks``: blocks [NB, 32, H, D] bf16/fp16/fp32 (last dim
    contiguous), fill [NB] int (1..32, rows >= fill ignored) -> (data [NB * 32, H, D/2] uint8,
    scales [NB * 32, H, D/32, 2] bf16), the same bytes. One program per (block, head)."""
    from sglang_memha.kvformat.kivi import BLOCK

    triton, j = _jit()
    if blocks.dim() != 4 or blocks.shape[1] != BLOCK or blocks.dtype not in (torch.bfloat16, torch.float16, torch.float32) \
            or blocks.stride(-1) != 1:
        raise ValueError(f"blocks={tuple(blocks.shape)} {blocks.dtype}: expected [NB, {BLOCK}, H, D] bf16/fp16/fp32, "
                         f"last dim contiguous")
    nb, _, h, d = blocks.shape
    format_spec(KVFormat.INT4_KIVI).check_head_dim(d)
    fill = fill.to(device=blocks.device, dtype=torch.int64).contiguous()
    if fill.shape != (nb,):
        raise ValueError(f"fill={tuple(fill.shape)}: expected [{nb}]")
    data = torch.zeros((nb * BLOCK, h, d // 2), dtype=torch.uint8, device=blocks.device)
    scales = torch.zeros((nb * BLOCK, h, d // BLOCK, 2), dtype=torch.bfloat16, device=blocks.device)
    if nb == 0:
        return data, scales
    j._quant_kivi_kernel[(nb * h,)](
        blocks, fill, data, scales, blocks.stride(0), blocks.stride(1), blocks.stride(2),
        data.stride(0), data.stride(1), scales.stride(0), scales.stride(1),
        H=h, BLK=BLOCK, HALF=d // 2, HALF_P2=triton.next_power_of_2(d // 2), PER=d // BLOCK,
        HW=_hw(blocks.device, hw), num_warps=num_warps,
    )
    return data, scales


def kivi_dequantize_pages(data_pool: torch.Tensor, scale_pool: torch.Tensor, page_ids: torch.Tensor,
                          page_size: int, head_dim: int, out_dtype: torch.dtype = torch.bfloat16,
                          num_warps: int = 4) -> torch.Tensor:
    """Triton ``Int4KiviKCodec.gather_dequantize`` of K pages (page_size a multiple of 32) ->
    [len(page_ids) * page_size, H, head_dim]. One program per (block, head)."""
    from sglang_memha.kvformat.kivi import BLOCK

    triton, j = _jit()
    _check_pools(KVFormat.INT4_KIVI, head_dim, data_pool, scale_pool)
    if page_ids.dim() != 1 or page_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"page_ids={tuple(page_ids.shape)} {page_ids.dtype}: expected 1-D int32/int64")
    if not isinstance(page_size, int) or page_size <= 0 or page_size % BLOCK:
        raise ValueError(f"page_size={page_size!r}: expected a positive multiple of {BLOCK}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype={out_dtype}: expected bf16, fp16 or fp32")
    n, h = page_ids.numel() * page_size, data_pool.shape[1]
    out = torch.empty((n, h, head_dim), dtype=out_dtype, device=data_pool.device)
    if n == 0:
        return out
    sv = scale_pool.view(torch.bfloat16)
    j._dequant_kivi_kernel[(n // BLOCK * h,)](
        data_pool, sv, page_ids, out, data_pool.stride(0), data_pool.stride(1), sv.stride(0), sv.stride(1),
        out.stride(0), out.stride(1), H=h, PAGE=page_size, BLK=BLOCK, HALF=head_dim // 2,
        HALF_P2=triton.next_power_of_2(head_dim // 2), PER=head_dim // BLOCK, num_warps=num_warps,
    )
    return out
