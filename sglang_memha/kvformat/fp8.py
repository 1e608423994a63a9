"""FP8 E4M3 codecs (OCP e4m3fn and AMD e4m3fnuz) with bf16 per-row scales, and the exact
fn <-> fnuz bridge.

Encodings of one byte ``s eeee mmm``:

    e4m3fn   bias 7: e>0: (-1)^s (1 + m/8) 2^(e-7); e=0: (-1)^s (m/8) 2^-6;
             0x7F/0xFF are NaN, no inf, max 448, 0x80 is -0.
    e4m3fnuz bias 8: e>0: (-1)^s (1 + m/8) 2^(e-8); e=0: (-1)^s (m/8) 2^-7;
             0x80 is the only NaN, no -0, no inf, max 240.

So for every code ``c`` outside {0x7F, 0xFF, 0x80}: ``fnuz(c) == fn(c) / 2`` exactly.

Scale (FORMAT_VERSION 3): one bf16 ``s`` per (token, kv-head). For a row with amax = max|x| (fp32):

    s = max(bf16_up(fp32(amax / C)), S_MIN)      C = 448, S_MIN = 2^-126 (fn)
                                                 C = 224, S_MIN = 2^-125 (fnuz)
    r = fp32(1 / s)                              (the reciprocal, part of the format)
    code = RNE_fp8(fp32(x * r)),   x_hat = fp8(code) * s   (exact in fp32)

``bf16_up`` rounds toward +inf, so s >= amax / C up to one fp32 rounding and ``|x * r|`` stays
within C (1 + 2^-22), which RNE maps to at most C: nothing saturates, no clamp is needed. The row's
largest element lands in (C / (1 + 2^-7), C] before rounding and rounds to C: its error is at
most 2^-7 of it (v2's power-of-two scale left it anywhere in (C/2, C], step 32 at the top).
Because 224 = 448 / 2, S_MIN(fnuz) = 2 S_MIN(fn) and fnuz's grid is fn's grid halved, the fnuz
encoder writes exactly the fn encoder's codes with s doubled (for every input, the S_MIN floor
included), and a page converts between the two by keeping its bytes and doubling / halving its
scales, see ``fn_to_fnuz`` / ``fnuz_to_fn``. Clamping fnuz at 224 instead of 240 keeps 0x7F/0xFF
unused.

Zero is always written as 0x00 (never 0x80) by the per-token-head codecs; an all-zero row gets
s = S_MIN and all-zero codes (what the formula gives; no special case).
"""

from __future__ import annotations

import math

import torch

from sglang_memha.kvformat.base import KVCodec, bf16_round, check_input, check_out_dtype
from sglang_memha.kvformat.cpu_kernels import (Fp8RowGather, fp8_dequantize_rows_bf16, fp8_gather_dequantize_bf16,
                                             fp8_quantize_rows)
from sglang_memha.kvformat.spec import KVFormat

E4M3FN_MAX = 448.0
E4M3FNUZ_MAX = 240.0
FNUZ_CLAMP = 224.0  # our fnuz encoder's range: keeps 0x7F/0xFF unused (exact bridge to fn)
S_MIN_FN = 2.0**-126  # smallest scale written (bf16 0x0080): keeps 1 / s a finite fp32
S_MIN_FNUZ = 2.0**-125  # = 2 * S_MIN_FN (bf16 0x0100), so fnuz scales are exactly fn scales * 2


def e4m3_value(code: int, fnuz: bool) -> float:
    """Decode one byte by the formula in the module docstring (reference for the LUTs)."""
    s, e, m = code >> 7, (code >> 3) & 0xF, code & 7
    if fnuz:
        if code == 0x80:
            return float("nan")
        bias = 8
    else:
        if e == 15 and m == 7:
            return float("nan")
        bias = 7
    mag = (m / 8) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 8) * 2.0 ** (e - bias)
    return -mag if s else mag


_LUTS: dict[tuple[object, torch.device], torch.Tensor] = {}


def decode_lut(fnuz: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """[256] fp32: value of each code."""
    key = (fnuz, torch.device(device))
    if key not in _LUTS:
        _LUTS[key] = torch.tensor([e4m3_value(c, fnuz) for c in range(256)], dtype=torch.float32, device=device)
    return _LUTS[key]


def fp8_row_scale(amax: torch.Tensor, clamp: float, s_min: float) -> torch.Tensor:
    """amax fp32 (finite, >= 0, any shape) -> bf16 s = max(bf16_up(fp32(amax / clamp)), s_min).

    fp32 division, correctly rounded (a tensor divisor: no reciprocal shortcut), then rounded
    toward +inf to bf16 on the bits (``base.bf16_round``). s_min is a bf16 power of two."""
    q = torch.div(amax, torch.full_like(amax, clamp))
    return torch.clamp_min(bf16_round(q, up=True), s_min)


def fp8_row_reciprocal(s: torch.Tensor) -> torch.Tensor:
    """bf16 s >= S_MIN -> fp32 r = fp32(1 / s), correctly rounded; finite since s >= 2^-126."""
    s32 = s.float()
    return torch.div(torch.ones_like(s32), s32)


class _Fp8TokenHead(KVCodec):
    fnuz: bool
    bias: int  # exponent bias of the encoding: 7 for e4m3fn, 8 for e4m3fnuz (the C kernels take it)
    clamp: float  # C: the row's amax is scaled to (C / (1 + 2^-7), C]
    s_min: float  # smallest scale written: 2^-126 (fn), 2^-125 (fnuz) -- the fnuz scale is the fn one x 2
    torch_dtype: torch.dtype
    scale_dtype = torch.bfloat16

    def scale_shape(self, num_tokens, num_kv_heads, head_dim):
        return (num_tokens, num_kv_heads, 1)

    def quantize(self, x, out=None):
        """s = ``fp8_row_scale`` of the row's amax; data = fp8_rne(fp32(x * fp32(1 / s))).

        out: optional preallocated (data uint8 [T, H, D], scale bf16 [T, H, 1]) to write into
        (quantize-on-write into a pool's slot range); returned as the result.
        On CPU a fused C kernel (``cpu_kernels``) produces the same bytes in one pass; the torch
        code below is the reference and the fallback.
        """
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            fused = fp8_quantize_rows(x, self.clamp, self.bias, self.s_min, out)
            if fused is not None and fused[2] == 0:
                return fused[0], fused[1]
            # bad inputs (or no kernel): the reference path validates and raises the precise error
        data, scale = self.quantize_reference(x)
        if out is None:
            return data, scale
        out[0].copy_(data)
        out[1].copy_(scale)
        return out

    def quantize_reference(self, x):
        """|x * r| <= C (1 + 2^-22) by the choice of s, which RNE maps to at most C, so no clamp is
        needed. Where x * r underflows below 2^-126 the code is 0 whatever the rounding."""
        x32 = check_input(x, self.spec)
        s = fp8_row_scale(x32.abs().amax(-1, keepdim=True), self.clamp, self.s_min)
        data = (x32 * fp8_row_reciprocal(s)).to(self.torch_dtype).view(torch.uint8)
        if not self.fnuz:
            data = torch.where(data == 0x80, 0, data).to(torch.uint8)
        return data, s

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        """x = fp8(data) * s, computed in fp32 (exact), then rounded to out_dtype.

        On CPU, bf16 output comes from a fused C kernel with the same bytes as the torch code below.
        """
        self.check_data(data, scales)
        check_out_dtype(out_dtype)
        if out_dtype == torch.bfloat16:
            fused = fp8_dequantize_rows_bf16(data, scales, self.bias)
            if fused is not None:
                return fused
        return self.dequantize_reference(data, scales, out_dtype)

    def dequantize_reference(self, data, scales, out_dtype=torch.bfloat16):
        vals = data.view(self.torch_dtype).float()
        return (vals * scales.float()).to(out_dtype)

    def gather_rows_fused(self, data_pool, scale_pool, slots, head_dim, out_dtype):
        if out_dtype != torch.bfloat16 or not torch.is_tensor(slots) or scale_pool is None:
            return None
        return fp8_gather_dequantize_bf16(data_pool, scale_pool, slots, head_dim, self.bias)

    def fused_row_reader(self, data_pool, scale_pool, head_dim, out_dtype):
        reader = (None if out_dtype != torch.bfloat16 or scale_pool is None
                  else Fp8RowGather.for_pools(data_pool, scale_pool, head_dim, self.bias))
        return reader or (lambda slots: None)


class Fp8TokenHeadCodec(_Fp8TokenHead):
    """fp8_e4m3: e4m3fn codes, one bf16 scale per (token, kv-head), amax scaled to ~448."""

    fmt = KVFormat.FP8_E4M3
    fnuz = False
    bias = 7
    clamp = E4M3FN_MAX
    s_min = S_MIN_FN
    torch_dtype = torch.float8_e4m3fn


class Fp8FnuzCodec(_Fp8TokenHead):
    """fp8_e4m3fnuz: e4m3fnuz codes, one bf16 scale per (token, kv-head), amax scaled to ~224."""

    fmt = KVFormat.FP8_E4M3FNUZ
    fnuz = True
    bias = 8
    clamp = FNUZ_CLAMP
    s_min = S_MIN_FNUZ
    torch_dtype = torch.float8_e4m3fnuz


class Fp8TensorCodec(KVCodec):
    """fp8_e4m3_tensor: SGLang's ``--kv-cache-dtype fp8_e4m3`` pool bytes, one scale per layer.

    data = (x / layer_scale computed in x's dtype).to(float8_e4m3fn) -- exactly what SGLang's
    ``MHATokenToKVPool.set_kv_buffer`` writes (torch's cast saturates finite values to +-448).
    ``scales`` is a [1] fp32 tensor holding layer_scale (1.0 when the checkpoint has none, as
    SGLang defaults). No -0 canonicalization here: bytes stay identical to SGLang's.
    """

    fmt = KVFormat.FP8_E4M3_TENSOR
    scale_dtype = torch.float32

    def quantize(self, x, scale: float | torch.Tensor = 1.0):
        check_input(x, self.spec)
        s = float(scale)
        if not (s > 0 and s < float("inf")):
            raise ValueError(f"scale={scale!r}: expected a positive finite per-layer scale")
        # a 0-dim fp32 tensor divisor: a true fp32 division (in x's dtype out) on every device;
        # CUDA turns division by a Python float into a multiply by its reciprocal (other bytes)
        y = x if s == 1.0 else x / torch.tensor(s, dtype=torch.float32, device=x.device)
        data = y.clamp(-E4M3FN_MAX, E4M3FN_MAX).to(torch.float8_e4m3fn)
        return data.view(torch.uint8), torch.tensor([s], dtype=torch.float32, device=x.device)

    def check_data(self, data, scales):
        head_dim = super().check_data(data, None)
        if scales is None or scales.numel() != 1 or scales.dtype != torch.float32:
            got = None if scales is None else f"{tuple(scales.shape)} {scales.dtype}"
            raise ValueError(f"scales={got}: expected the per-layer scale as a [1] fp32 tensor")
        return head_dim

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        self.check_data(data, scales)
        check_out_dtype(out_dtype)
        return (data.view(torch.float8_e4m3fn).float() * scales.reshape(())).to(out_dtype)

    def gather_dequantize(self, data_pool, scale_pool, page_ids, page_size, out_dtype=torch.bfloat16, **kw):
        """``scale_pool`` here is the [1] fp32 layer scale (no per-token companion rows)."""
        slots = (page_ids.long()[:, None] * page_size + torch.arange(page_size, device=page_ids.device)).reshape(-1)
        return self.dequantize(data_pool[slots], scale_pool, out_dtype)

    def quantize_into(self, x, loc, data_pool, scale_pool, scale: float = 1.0):
        data, _ = self.quantize(x, scale)
        data_pool[loc] = data


# ---------------------------------------------------------------- fn <-> fnuz bridge

def _bridge_scales(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Validate; return the scales as bf16 [..., 1] and whether they came as raw bytes
    ([..., 2] uint8, a pool's companion row), in which form the result goes back."""
    if data.dtype != torch.uint8:
        raise ValueError(f"data.dtype={data.dtype}: expected uint8 fp8 codes")
    if scales.dtype == torch.uint8 and scales.dim() >= 1 and scales.shape[-1] == 2:
        raw, scales = True, scales.contiguous().view(torch.bfloat16)
    elif scales.dtype == torch.bfloat16:
        raw = False
    else:
        raise ValueError(f"scales={tuple(scales.shape)} {scales.dtype}: expected bf16 scales [..., 1] "
                         f"or their raw bytes uint8 [..., 2]")
    bad = ~scales.float().isfinite()
    if bool(bad.any()):
        raise ValueError(f"scales hold {int(bad.sum())} non-finite bf16 scale(s); refusing to convert")
    return scales, raw


def _bridge_out(scales: torch.Tensor, raw: bool) -> torch.Tensor:
    return scales.contiguous().view(torch.uint8) if raw else scales


def fn_to_fnuz(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn page -> e4m3fnuz page, value-exact for every finite code.

    data [..., head_dim] uint8; scales bf16 broadcastable per row ([..., 1]) or the raw scale bytes
    ([..., 2] uint8, returned in the same form). Bytes are kept except 0x80 (-0) -> 0x00; every
    scale doubles (exact in bf16). The result is what our fnuz encoder writes for the same input.
    NaN codes (0x7F, 0xFF), non-finite scales and |s| >= 2^127 (2 s would overflow; our fn encoder
    writes s < 2^57) raise ValueError.
    """
    scales, raw = _bridge_scales(data, scales)
    nan = (data & 0x7F) == 0x7F
    if bool(nan.any()):
        raise ValueError(f"data holds {int(nan.sum())} e4m3fn NaN code(s) (0x7F/0xFF); refusing to convert")
    big = scales.float().abs() >= 2.0**127
    if bool(big.any()):
        raise ValueError(f"scales hold {int(big.sum())} scale(s) >= 2^127: twice that is not a finite bf16")
    doubled = (scales.float() * 2).to(torch.bfloat16)  # exact: an exponent + 1 (or a subnormal shift)
    return torch.where(data == 0x80, 0, data).to(torch.uint8), _bridge_out(doubled, raw)


def fnuz_to_fn(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fnuz page -> e4m3fn page. data [..., head_dim] uint8; scales bf16 broadcastable per row
    ([..., 1]) or the raw scale bytes ([..., 2] uint8, returned in the same form).

    Rows without +-240 (0x7F/0xFF) whose s / 2 is a bf16 (every s >= 2^-125, i.e. every row our
    fnuz encoder writes): bytes kept, scale halved (exact). Other rows (a foreign encoder: +-240, or
    a scale below 2^-125 with its last mantissa bit set): scale kept and each value re-encoded as
    e4m3fn; exact unless the row also holds a value m*2^-10 with m odd (codes 0x01-0x0F odd, either
    sign: fnuz's odd subnormals and lowest normal binade), which e4m3fn lacks -- those round to
    nearest even (|error| <= 2^-10 * s). NaN (0x80) and non-finite scales raise ValueError.
    """
    scales, raw = _bridge_scales(data, scales)
    nan = data == 0x80
    if bool(nan.any()):
        raise ValueError(f"data holds {int(nan.sum())} e4m3fnuz NaN code(s) (0x80); refusing to convert")
    half32 = scales.float() / 2  # exact in fp32
    half = half32.to(torch.bfloat16)
    is_max = (data & 0x7F) == 0x7F
    # per-row scales re-encode only the rows concerned; one shared scale decides for all rows
    wide = (is_max.any(-1, keepdim=True) if scales.dim() == data.dim() else is_max.any()) | (half.float() != half32)
    if not bool(wide.any()):
        return data.clone(), _bridge_out(half, raw)
    reenc = decode_lut(True, data.device)[data.long()].to(torch.float8_e4m3fn).view(torch.uint8)
    reenc = torch.where(reenc == 0x80, 0, reenc).to(torch.uint8)
    return torch.where(wide, reenc, data), _bridge_out(torch.where(wide, scales, half), raw)


def layer_to_token_scale(data: torch.Tensor, layer_scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_e4m3_tensor page (stock SGLang fp8 pool) -> fp8_e4m3 page: bytes kept, every row's
    scale = layer_scale as bf16. data [T, H, head_dim] uint8 -> (data, scales bf16 [T, H, 1]).

    Exact, but only for a positive finite layer scale that is a bf16 value (SGLang's default 1.0
    when the checkpoint has no k_scale/v_scale, any power of two in [2^-133, 2^127], ...); any other
    layer scale raises ValueError (a bf16 scale cannot hold it; re-quantizing would round twice).
    """
    s = float(layer_scale)
    as_bf16 = torch.tensor(s, dtype=torch.float32).to(torch.bfloat16)
    if not (0 < s < math.inf) or float(as_bf16) != s:
        raise ValueError(f"layer_scale={layer_scale!r}: fp8_e4m3 pages take only a positive layer scale "
                         f"that is exactly a bf16 value without re-quantizing")
    if data.dtype != torch.uint8 or data.dim() != 3:
        raise ValueError(f"data={tuple(data.shape)} {data.dtype}: expected uint8 [T, H, head_dim]")
    return data, torch.full((*data.shape[:2], 1), s, dtype=torch.bfloat16, device=data.device)
