"""Paged decode attention over format-v4 pool buffers, dequantizing inside the kernel.

One query token per request attends to its request's KV tokens, read straight from the pool's
code and scale buffers of one layer (``docs/kv_format.md``, "Page geometry"); no bf16 copy of
the KV is made. Tensors (all on one CUDA device, or CPU under ``TRITON_INTERPRET=1``)::

    q          [batch, num_q_heads, head_dim]                     fp32 | bf16 | fp16, last dim contiguous
    k_data     [num_slots, num_kv_heads, data_bytes_per_head]     uint8, contiguous (bf16: 2 * head_dim bytes)
    k_scale    [num_slots, num_kv_heads, scale_bytes_per_head]    uint8, contiguous; None for bf16
    v_data     like k_data;  v_scale like k_scale
    kv_indptr  [batch + 1]                                        int32; request b: kv_indices[indptr[b]:indptr[b+1]]
    kv_indices [total_kv_tokens]                                  int32 | int64 slot ids, in token order
    out        [batch, num_q_heads, head_dim]                     fp32 | bf16 | fp16 (default: q's dtype)

Paging is SGLang's Triton-backend convention: token-level slot ids, slot ``s`` being token
``s % page_size`` of page ``s // page_size``; the kernel never needs the page size, so any page
size works. Query heads are grouped (GQA): q head ``h`` reads KV head ``h // (num_q_heads //
num_kv_heads)``. ``o = softmax(sm_scale * q . K^T) V`` per (request, q head), accumulated in fp32;
a request with no KV tokens gets o = 0. With ``logit_cap`` > 0 each scaled logit x becomes
``cap * tanh(x / cap)`` first (soft-capping, as SGLang's kernels).

Formats and their dequantization (x = the value attention sees):

    bf16          x = bf16(data)
    fp8_e4m3      x = e4m3fn(data) * scale           scale: bf16 per (token, kv head)
    fp8_e4m3fnuz  x = e4m3fnuz(data) * scale         scale: bf16 per (token, kv head)
    int8          x = int8(data) * scale             scale: fp32 per (token, kv head)
    int4_g32/g64  x = uint4(data) * scale_g + min_g  (scale_g, min_g): bf16 pair per group of 32/64
                                                      channels; element 2i in the low nibble, 2i+1 in the high

For the per-token formats the dots run on the exact code values and the scales are applied to
the logit row (K) and to the softmax weights (V). fp8 is decoded by integer arithmetic (any GPU,
the interpreter) or by the GPU's e4m3fn conversion (``hw``, sm_89+), with the same values.
Dot precision: fp32 q runs fp32 dots (``input_precision="ieee"``, no TF32); bf16/fp16 q runs dots
in q's dtype (codes are exact in it; int4's dequantized values, bf16 K/V under fp16 q and the
softmax weights are rounded to it, as in SGLang's bf16 kernel).

K offset (``MEMHA_K_OFFSET``) and the Hadamard rotation are applied outside this kernel. A K
offset needs no correction here: keys stored as k - c give q . (k - c) = q . k - q . c, and q . c
is the same for every key of one query row, so it cancels in the softmax (softmax is invariant
to adding a constant to a row). V has no offset.

Triton is imported lazily (``RuntimeError`` without it); the arguments are checked first and a
bad one raises ``ValueError`` naming it. Slot ids are not range-checked on the device (no sync).
"""

from __future__ import annotations

import functools
import math
import os

import torch

from sglang_memha.kvformat.spec import KVFormat, format_spec

DECODE_FORMATS = (
    KVFormat.BF16, KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ, KVFormat.INT8, KVFormat.INT4_G32, KVFormat.INT4_G64,
)
_MODE = {KVFormat.BF16: 0, KVFormat.FP8_E4M3: 1, KVFormat.FP8_E4M3FNUZ: 2, KVFormat.INT8: 3,
         KVFormat.INT4_G32: 4, KVFormat.INT4_G64: 4}
_SCALE_DTYPE = {KVFormat.FP8_E4M3: torch.bfloat16, KVFormat.FP8_E4M3FNUZ: torch.bfloat16, KVFormat.INT8: torch.float32,
                KVFormat.INT4_G32: torch.bfloat16, KVFormat.INT4_G64: torch.bfloat16}
BLOCK_N = 32  # KV tokens per loop step (not tuned on a GPU yet)
MAX_KV_SPLITS = 16
MIN_TOKENS_PER_SPLIT = 64
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _jit():
    try:
        import triton
        import triton.language as tl

        from sglang_memha.attention import _decode_jit as j
    except ImportError as e:
        raise RuntimeError("sglang_memha.attention.decode needs the `triton` package") from e
    return triton, tl, j


def default_num_kv_splits(max_kv_len: int) -> int:
    """Splits per request: one per ``MIN_TOKENS_PER_SPLIT`` tokens of the longest request, at
    most ``MAX_KV_SPLITS`` (a rule of thumb, not yet tuned on a GPU)."""
    return max(1, min(MAX_KV_SPLITS, -(-max_kv_len // MIN_TOKENS_PER_SPLIT)))


def _bad(name: str, t, expected: str) -> ValueError:
    got = f"{tuple(t.shape)} {t.dtype} on {t.device}" if isinstance(t, torch.Tensor) else repr(t)
    return ValueError(f"{name}={got}: expected {expected}")


def _check_buffer(name: str, t, num_slots, heads, per_head: int) -> None:
    want = f"contiguous uint8 [num_slots, num_kv_heads, {per_head}]"
    if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or t.dim() != 3 or t.shape[2] != per_head \
            or not t.is_contiguous():
        raise _bad(name, t, want)
    if num_slots is not None and tuple(t.shape[:2]) != (num_slots, heads):
        raise _bad(name, t, f"{want} with the slots and heads of k_data: ({num_slots}, {heads}, {per_head})")


def _check(fmt, q, k_data, k_scale, v_data, v_scale, kv_indptr, kv_indices, sm_scale, num_kv_splits, block_n,
           out, out_dtype):
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in FLOAT_DTYPES or q.stride(-1) != 1:
        raise _bad("q", q, "[batch, num_q_heads, head_dim] fp32/bf16/fp16, last dim contiguous")
    batch, hq, d = q.shape
    spec = format_spec(fmt)
    if d < 16:
        raise _bad("q", q, "head_dim >= 16")
    try:
        spec.check_head_dim(d)
    except ValueError as e:
        raise ValueError(f"q: {e}") from None
    db, sb = spec.data_bytes_per_head(d), spec.scale_bytes_per_head(d)
    _check_buffer("k_data", k_data, None, None, db)
    slots, hkv = k_data.shape[:2]
    _check_buffer("v_data", v_data, slots, hkv, db)
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if sb == 0 and t is not None:
            raise _bad(name, t, f"None: {fmt.value} has no scale rows")
        if sb:
            if t is None:
                raise _bad(name, t, f"contiguous uint8 [num_slots, num_kv_heads, {sb}] ({fmt.value} scale rows)")
            _check_buffer(name, t, slots, hkv, sb)
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads and k_data {hkv} kv heads: num_q_heads must be a multiple of num_kv_heads")
    if not isinstance(kv_indptr, torch.Tensor) or kv_indptr.dtype != torch.int32 or kv_indptr.shape != (batch + 1,):
        raise _bad("kv_indptr", kv_indptr, f"[{batch + 1}] int32 (batch + 1)")
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() != 1 \
            or kv_indices.dtype not in (torch.int32, torch.int64) or kv_indices.stride(0) != 1:
        raise _bad("kv_indices", kv_indices, "1-D contiguous int32/int64 slot ids")
    if not isinstance(sm_scale, (int, float)) or not math.isfinite(sm_scale) or sm_scale <= 0:
        raise ValueError(f"sm_scale={sm_scale!r}: expected a finite float > 0")
    if num_kv_splits is not None and (not isinstance(num_kv_splits, int) or num_kv_splits < 1):
        raise ValueError(f"num_kv_splits={num_kv_splits!r}: expected an int >= 1 or None")
    if not isinstance(block_n, int) or block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n={block_n!r}: expected a power of two >= 16")
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: expected fp32, bf16 or fp16")
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != q.shape or out.dtype != out_dtype
                            or out.stride(-1) != 1):
        raise _bad("out", out, f"{tuple(q.shape)} {out_dtype}, last dim contiguous")
    named = [("q", q), ("k_data", k_data), ("v_data", v_data), ("k_scale", k_scale), ("v_scale", v_scale),
             ("kv_indptr", kv_indptr), ("kv_indices", kv_indices), ("out", out)]
    devs = {n: t.device for n, t in named if t is not None}
    if len(set(devs.values())) != 1:
        raise ValueError(f"all tensors must be on one device, got {devs}")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"q on {q.device}: expected CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)")


def decode_attention(
    fmt: str | KVFormat,
    q: torch.Tensor,
    k_data: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_data: torch.Tensor,
    v_scale: torch.Tensor | None,
    kv_indptr: torch.Tensor,
    kv_indices: torch.Tensor,
    sm_scale: float,
    num_kv_splits: int | None = None,
    max_kv_len: int | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    hw: bool | None = None,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """Decode attention of one layer (shapes and formulas in the module docstring) -> ``out``.

    ``num_kv_splits``: splits of each request's KV (flash-decoding); None picks
    ``default_num_kv_splits(max_kv_len)``, and ``max_kv_len`` None reads it from ``kv_indptr``
    (a device-to-host copy: pass one of them under CUDA graphs). Any count gives the same result
    up to fp32 rounding. ``block_n``, ``num_warps``: launch shape. ``hw``: fp8 through the GPU's
    e4m3fn conversion (None: where available, never under the interpreter). ``logit_cap`` > 0:
    logits soft-capped as ``cap * tanh(sm_scale * q . k / cap)`` (SGLang's convention)."""
    if not isinstance(logit_cap, (int, float)) or not math.isfinite(logit_cap) or logit_cap < 0:
        raise ValueError(f"logit_cap={logit_cap!r}: expected a finite float >= 0 (0: no soft-capping)")
    fmt = KVFormat.parse(fmt)
    if fmt not in DECODE_FORMATS:
        raise ValueError(f"fmt={fmt.value}: decode_attention covers {[f.value for f in DECODE_FORMATS]}")
    out_dtype = (q.dtype if isinstance(q, torch.Tensor) else None) if out_dtype is None else out_dtype
    _check(fmt, q, k_data, k_scale, v_data, v_scale, kv_indptr, kv_indices, sm_scale, num_kv_splits, block_n,
           out, out_dtype)
    triton, tl, j = _jit()
    from sglang_memha.kvformat.triton_kernels import _hw

    batch, hq, d = q.shape
    hkv = k_data.shape[1]
    group = hq // hkv
    if out is None:
        out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    if batch == 0:
        return out
    if num_kv_splits is None:
        if max_kv_len is None:
            max_kv_len = int((kv_indptr[1:] - kv_indptr[:-1]).max())
        num_kv_splits = default_num_kv_splits(max_kv_len)
    mode = _MODE[fmt]
    gs = format_spec(fmt).group_size or 1
    ng = d // gs
    block_d = triton.next_power_of_2(d)
    if fmt == KVFormat.BF16:
        kd, vd = k_data.view(torch.bfloat16), v_data.view(torch.bfloat16)  # [slots, H, D] bf16
        ks = vs = kd  # unused: a valid pointer of the right device
    else:
        kd, vd = k_data, v_data
        ks, vs = k_scale.view(_SCALE_DTYPE[fmt]), v_scale.view(_SCALE_DTYPE[fmt])
    mid_o = torch.empty((batch, hq, num_kv_splits, d), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, hq, num_kv_splits), dtype=torch.float32, device=q.device)
    dot_dtype = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[q.dtype]
    j._decode_stage1[(batch, hkv, num_kv_splits)](
        q, kd, ks, vd, vs, kv_indptr, kv_indices, mid_o, mid_lse, sm_scale * j.LOG2E, sm_scale,
        q.stride(0), q.stride(1), kd.stride(0), kd.stride(1), ks.stride(0), ks.stride(1),
        vd.stride(0), vd.stride(1), vs.stride(0), vs.stride(1),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=d, BLOCK_D=block_d, BLOCK_N=block_n,
        NUM_SPLITS=num_kv_splits, MODE=mode, NG=ng, NG_P2=triton.next_power_of_2(ng), GS=gs,
        DOT_DTYPE=dot_dtype, HW=_hw(q.device, hw) if mode in (1, 2) else False, LOGIT_CAP=float(logit_cap),
        num_warps=num_warps,
    )
    j._decode_stage2[(batch, hq)](
        mid_o, mid_lse, out, kv_indptr,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        D=d, BLOCK_D=block_d, BLOCK_N=block_n, NUM_SPLITS=num_kv_splits, num_warps=num_warps,
    )
    return out


__all__ = ["BLOCK_N", "DECODE_FORMATS", "decode_attention", "default_num_kv_splits"]
