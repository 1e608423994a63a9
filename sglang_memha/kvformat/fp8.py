"""FP8 E4M3 codecs (OCP e4m3fn and AMD e4m3fnuz) with E8M0 per-row scales, and the exact
fn <-> fnuz bridge.

Encodings of one byte ``s eeee mmm``:

    e4m3fn   bias 7: e>0: (-1)^s (1 + m/8) 2^(e-7); e=0: (-1)^s (m/8) 2^-6;
             0x7F/0xFF are NaN, no inf, max 448, 0x80 is -0.
    e4m3fnuz bias 8: e>0: (-1)^s (1 + m/8) 2^(e-8); e=0: (-1)^s (m/8) 2^-7;
             0x80 is the only NaN, no -0, no inf, max 240.

So for every code ``c`` outside {0x7F, 0xFF, 0x80}: ``fnuz(c) == fn(c) / 2`` exactly.

Scale (FORMAT_VERSION 2): one E8M0 byte ``e`` per (token, kv-head), scale = 2^(e - 127) (OCP MX
E8M0: e = 0 is 2^-127, 255 is NaN and never written). For a row with amax = max|x| (fp32),
k = e - 127 is the smallest integer with amax <= C * 2^k, C = 448 (fn) or 224 (fnuz), and e is
clamped to [E_MIN, 254] with E_MIN = 0 (fn) / 1 (fnuz); codes = RNE(x * 2^-k), an exact multiply.
Because 224 = 448 / 2 and fnuz's grid is fn's grid halved, the fnuz encoder writes exactly the fn
encoder's codes with the exponent byte + 1 (for every input, the lower clamps included), and a page
converts between the two by keeping its bytes and moving its exponent bytes by one, see
``fn_to_fnuz`` / ``fnuz_to_fn``. Clamping fnuz at 224 instead of 240 keeps 0x7F/0xFF unused.

Zero is always written as 0x00 (never 0x80) by the per-token-head codecs; an all-zero row gets
e = E_MIN and all-zero codes (what the formula gives; no special case).
"""

from __future__ import annotations

import math
import struct

import torch

from sglang_memha.kvformat.base import KVCodec, check_input, check_out_dtype
from sglang_memha.kvformat.cpu_kernels import fp8_dequantize_rows_bf16, fp8_quantize_rows
from sglang_memha.kvformat.spec import KVFormat

E4M3FN_MAX = 448.0
E4M3FNUZ_MAX = 240.0
FNUZ_CLAMP = 224.0  # our fnuz encoder's range: keeps 0x7F/0xFF unused (exact bridge to fn)
E8M0_MAX = 254  # largest exponent byte written; 255 is E8M0's NaN
E8M0_NAN = 255


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


def e8m0_to_f32(e: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes (uint8, any shape) -> fp32 2^(e - 127), exact (e = 0 is the subnormal 2^-127);
    255 -> NaN."""
    key = ("e8m0", e.device)
    if key not in _LUTS:
        vals = [2.0 ** (c - 127) for c in range(255)] + [float("nan")]
        _LUTS[key] = torch.tensor(vals, dtype=torch.float32, device=e.device)
    return _LUTS[key][e.long()]


def _f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def e8m0_exponent(amax: torch.Tensor, clamp: float, e_min: int) -> torch.Tensor:
    """amax fp32 (finite, >= 0, any shape) -> int32 e = clamp(k + 127, e_min, 254), k the smallest
    integer with amax <= clamp * 2^k. Exact: integer arithmetic on the fp32 bits, no log2.

    With amax = (1 + fa) 2^Ea and clamp = (1 + fc) 2^Ec (normal; fa, fc the 23-bit mantissa
    fields / 2^23): amax <= clamp 2^k  <=>  (1 + fa) 2^(Ea - Ec - k) <= 1 + fc, so the smallest k
    is Ea - Ec + [fa > fc]. Adding 0x7FFFFF - mantissa(clamp) to amax's bits carries into the
    exponent field exactly when fa > fc, hence e = ((bits + 0x7FFFFF - mantissa(clamp)) >> 23) - Ec.
    A zero or subnormal fp32 amax gives e <= 1 - Ec < e_min (clamped). The upper clamp never
    binds: a finite fp32 amax gives e <= 248, and |x| <= 2^64 gives e <= 184.
    """
    add, ec = e8m0_constants(clamp)
    bits = amax.contiguous().view(torch.int32)
    return ((bits + add) >> 23).sub_(ec).clamp_(e_min, E8M0_MAX)


def e8m0_constants(clamp: float) -> tuple[int, int]:
    """(0x7FFFFF - mantissa field of clamp, unbiased exponent Ec of clamp): the two integers of
    ``e8m0_exponent``'s bit formula (the Triton kernel takes them as constants)."""
    cb = _f32_bits(clamp)
    return 0x7FFFFF - (cb & 0x7FFFFF), (cb >> 23) - 127


def _inv_pow2(e: torch.Tensor) -> torch.Tensor:
    """fp32 2^(127 - e) = 2^-k for int32 e in [0, 253] (a normal fp32; e <= 248 always, see
    ``e8m0_exponent``)."""
    return ((254 - e) << 23).view(torch.float32)


class _Fp8TokenHead(KVCodec):
    fnuz: bool
    bias: int  # exponent bias of the encoding: 7 for e4m3fn, 8 for e4m3fnuz (the C kernels take it)
    clamp: float  # C: amax is scaled into (C / 2, C]
    e_min: int  # smallest exponent byte written: 0 (fn), 1 (fnuz) -- the fnuz byte is the fn byte + 1
    torch_dtype: torch.dtype
    scale_dtype = torch.uint8  # E8M0

    def scale_shape(self, num_tokens, num_kv_heads, head_dim):
        return (num_tokens, num_kv_heads, 1)

    def quantize(self, x, out=None):
        """e = E8M0 exponent of the row (see ``e8m0_exponent``); data = fp8_rne(x * 2^(127 - e)).

        out: optional preallocated (data uint8 [T, H, D], scale uint8 [T, H, 1]) to write into
        (quantize-on-write into a pool's slot range); returned as the result.
        On CPU a fused C kernel (``cpu_kernels``) produces the same bytes in one pass; the torch
        code below is the reference and the fallback.
        """
        if isinstance(x, torch.Tensor) and x.dim() == 3:
            fused = fp8_quantize_rows(x, self.clamp, self.bias, out)
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
        """|x * 2^-k| <= C by the choice of k, and RNE keeps it there (C is a code), so no clamp is
        needed. The multiply is exact except where it underflows below 2^-126, which is far below
        half the smallest fp8 subnormal, so the code (0) is the same as from the exact product."""
        x32 = check_input(x, self.spec)
        e = e8m0_exponent(x32.abs().amax(-1, keepdim=True), self.clamp, self.e_min)
        data = (x32 * _inv_pow2(e)).to(self.torch_dtype).view(torch.uint8)
        if not self.fnuz:
            data = torch.where(data == 0x80, 0, data).to(torch.uint8)
        return data, e.to(torch.uint8)

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        """x = fp8(data) * 2^(e - 127), computed in fp32 (exact), then rounded to out_dtype.

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
        return (vals * e8m0_to_f32(scales)).to(out_dtype)


class Fp8TokenHeadCodec(_Fp8TokenHead):
    """fp8_e4m3: e4m3fn codes, one E8M0 scale byte per (token, kv-head), amax scaled into (224, 448]."""

    fmt = KVFormat.FP8_E4M3
    fnuz = False
    bias = 7
    clamp = E4M3FN_MAX
    e_min = 0
    torch_dtype = torch.float8_e4m3fn


class Fp8FnuzCodec(_Fp8TokenHead):
    """fp8_e4m3fnuz: e4m3fnuz codes, one E8M0 scale byte per (token, kv-head), amax into (112, 224]."""

    fmt = KVFormat.FP8_E4M3FNUZ
    fnuz = True
    bias = 8
    clamp = FNUZ_CLAMP
    e_min = 1
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
        y = x if s == 1.0 else x / s
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

def _check_bridge_args(data: torch.Tensor, scales: torch.Tensor) -> None:
    if data.dtype != torch.uint8:
        raise ValueError(f"data.dtype={data.dtype}: expected uint8 fp8 codes")
    if scales.dtype != torch.uint8:
        raise ValueError(f"scales.dtype={scales.dtype}: expected uint8 E8M0 exponent bytes")
    nan = scales == E8M0_NAN
    if bool(nan.any()):
        raise ValueError(f"scales hold {int(nan.sum())} E8M0 NaN byte(s) (0xFF); refusing to convert")


def fn_to_fnuz(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn page -> e4m3fnuz page, value-exact for every finite code.

    data [..., head_dim] uint8, scales uint8 E8M0 bytes broadcastable per row ([..., 1]).
    Bytes are kept except 0x80 (-0) -> 0x00; exponent bytes + 1 (scale x 2). The result is what
    our fnuz encoder writes for the same input. NaN codes (0x7F, 0xFF) and exponent byte 254
    (no fnuz counterpart; our fn encoder writes at most 248) raise ValueError.
    """
    _check_bridge_args(data, scales)
    nan = (data & 0x7F) == 0x7F
    if bool(nan.any()):
        raise ValueError(f"data holds {int(nan.sum())} e4m3fn NaN code(s) (0x7F/0xFF); refusing to convert")
    top = scales == E8M0_MAX
    if bool(top.any()):
        raise ValueError(f"scales hold {int(top.sum())} exponent byte(s) 254: 2^128 is not an E8M0 scale")
    return torch.where(data == 0x80, 0, data).to(torch.uint8), scales + 1


def fnuz_to_fn(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fnuz page -> e4m3fn page. data [..., head_dim] uint8, scales uint8 E8M0 bytes
    broadcastable per row ([..., 1]).

    Rows without +-240 (0x7F/0xFF) and with e >= 1 -- every row our fnuz encoder writes: bytes
    kept, exponent byte - 1 (exact). Other rows (a foreign encoder: +-240, or scale 2^-127, for which
    fn would need 2^-128): exponent kept and each value re-encoded as e4m3fn; exact unless the row
    also holds a value m*2^-10 with m odd (codes 0x01-0x0F odd, either sign: fnuz's odd subnormals
    and lowest normal binade), which e4m3fn lacks -- those round to nearest even
    (|error| <= 2^-10 * scale). NaN (0x80) raises ValueError.
    """
    _check_bridge_args(data, scales)
    nan = data == 0x80
    if bool(nan.any()):
        raise ValueError(f"data holds {int(nan.sum())} e4m3fnuz NaN code(s) (0x80); refusing to convert")
    is_max = (data & 0x7F) == 0x7F
    # per-row scales re-encode only the rows concerned; one shared scale decides for all rows
    wide = (is_max.any(-1, keepdim=True) if scales.dim() == data.dim() else is_max.any()) | (scales == 0)
    if not bool(wide.any()):
        return data.clone(), scales - 1
    reenc = decode_lut(True, data.device)[data.long()].to(torch.float8_e4m3fn).view(torch.uint8)
    reenc = torch.where(reenc == 0x80, 0, reenc).to(torch.uint8)
    return torch.where(wide, reenc, data), torch.where(wide, scales, scales - 1)


def layer_to_token_scale(data: torch.Tensor, layer_scale: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_e4m3_tensor page (stock SGLang fp8 pool) -> fp8_e4m3 page: bytes kept, every row's
    exponent byte = log2(layer_scale) + 127. data [T, H, head_dim] uint8 -> (data, scales [T, H, 1]).

    Exact, but only for a power-of-two layer scale in [2^-127, 2^127] (SGLang's default 1.0 when the
    checkpoint has no k_scale/v_scale); any other layer scale raises ValueError (an E8M0 scale cannot
    hold it; re-quantizing would round twice).
    """
    s = float(layer_scale)
    m, ex = math.frexp(s) if 0 < s < math.inf else (0.0, 0)
    e = ex - 1 + 127  # s = 0.5 * 2^ex = 2^(e - 127)
    if m != 0.5 or not 0 <= e <= E8M0_MAX:
        raise ValueError(f"layer_scale={layer_scale!r}: fp8_e4m3 pages take only a power-of-two layer scale "
                         f"in [2^-127, 2^127] without re-quantizing")
    if data.dtype != torch.uint8 or data.dim() != 3:
        raise ValueError(f"data={tuple(data.shape)} {data.dtype}: expected uint8 [T, H, head_dim]")
    return data, torch.full((*data.shape[:2], 1), e, dtype=torch.uint8, device=data.device)
