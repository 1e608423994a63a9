"""FP8 E4M3 codecs (OCP e4m3fn and AMD e4m3fnuz) and the exact fn <-> fnuz bridge.

Encodings of one byte ``s eeee mmm``:

    e4m3fn   bias 7: e>0: (-1)^s (1 + m/8) 2^(e-7); e=0: (-1)^s (m/8) 2^-6;
             0x7F/0xFF are NaN, no inf, max 448, 0x80 is -0.
    e4m3fnuz bias 8: e>0: (-1)^s (1 + m/8) 2^(e-8); e=0: (-1)^s (m/8) 2^-7;
             0x80 is the only NaN, no -0, no inf, max 240.

So for every code ``c`` outside {0x7F, 0xFF, 0x80}: ``fnuz(c) == fn(c) / 2`` exactly. A page
converts between the two by keeping its bytes and scaling its fp32 scales by 2 (exact), see
``fn_to_fnuz`` / ``fnuz_to_fn``. Our fnuz encoder clamps at +-224 (code 0x7E) instead of 240, so
it never emits 0x7F/0xFF and its pages always convert with bytes unchanged.

Encoders round to nearest, ties to even (torch's float8 casts), after clamping to the format's
range (saturation). Zero is always written as 0x00 (never 0x80) by the per-token-head codecs.
"""

from __future__ import annotations

import torch

from sglang_memha.kvformat.base import KVCodec, check_input, check_out_dtype
from sglang_memha.kvformat.cpu_kernels import fp8_dequantize_rows_bf16, fp8_quantize_rows
from sglang_memha.kvformat.spec import KVFormat

E4M3FN_MAX = 448.0
E4M3FNUZ_MAX = 240.0
FNUZ_CLAMP = 224.0  # our fnuz encoder's range: keeps 0x7F/0xFF unused (exact bridge to fn)


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


_LUTS: dict[tuple[bool, torch.device], torch.Tensor] = {}


def decode_lut(fnuz: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """[256] fp32: value of each code."""
    key = (fnuz, torch.device(device))
    if key not in _LUTS:
        _LUTS[key] = torch.tensor([e4m3_value(c, fnuz) for c in range(256)], dtype=torch.float32, device=device)
    return _LUTS[key]


def _per_head_scale(x32: torch.Tensor, fmax: float) -> torch.Tensor:
    """[T, H, 1] fp32: amax over head_dim / fmax (0 for an all-zero row)."""
    return x32.abs().amax(-1, keepdim=True) / fmax


def _scaled(x32: torch.Tensor, scale: torch.Tensor, fmax: float) -> torch.Tensor:
    y = torch.where(scale > 0, x32 / torch.where(scale > 0, scale, 1.0), 0.0)
    return y.clamp_(-fmax, fmax)


class _Fp8TokenHead(KVCodec):
    fnuz: bool
    bias: int  # exponent bias of the encoding: 7 for e4m3fn, 8 for e4m3fnuz (the C kernels take it)
    clamp: float
    torch_dtype: torch.dtype
    scale_dtype = torch.float32

    def scale_shape(self, num_tokens, num_kv_heads, head_dim):
        return (num_tokens, num_kv_heads, 1)

    def quantize(self, x, out=None):
        """scale = amax_row / clamp (fp32); data = fp8_rne(clamp(x / scale)); zero -> 0x00.

        out: optional preallocated (data uint8 [T, H, D], scale fp32 [T, H, 1]) to write into
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
        x32 = check_input(x, self.spec)
        scale = _per_head_scale(x32, self.clamp)
        data = _scaled(x32, scale, self.clamp).to(self.torch_dtype).view(torch.uint8)
        if not self.fnuz:
            data = torch.where(data == 0x80, 0, data).to(torch.uint8)
        return data, scale

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        """x = fp8(data) * scale, computed in fp32, then rounded to out_dtype.

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
        return (vals * scales).to(out_dtype)


class Fp8TokenHeadCodec(_Fp8TokenHead):
    """fp8_e4m3: e4m3fn codes, one fp32 scale per (token, kv-head) = amax / 448."""

    fmt = KVFormat.FP8_E4M3
    fnuz = False
    bias = 7
    clamp = E4M3FN_MAX
    torch_dtype = torch.float8_e4m3fn


class Fp8FnuzCodec(_Fp8TokenHead):
    """fp8_e4m3fnuz: e4m3fnuz codes, one fp32 scale per (token, kv-head) = amax / 224."""

    fmt = KVFormat.FP8_E4M3FNUZ
    fnuz = True
    bias = 8
    clamp = FNUZ_CLAMP
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
    if scales.dtype != torch.float32:
        raise ValueError(f"scales.dtype={scales.dtype}: expected fp32")


def fn_to_fnuz(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fn page -> e4m3fnuz page, value-exact for every finite code.

    Bytes are kept except 0x80 (-0) -> 0x00; scales are doubled (exact in fp32).
    NaN codes (0x7F, 0xFF) cannot come from our encoders and raise ValueError.
    """
    _check_bridge_args(data, scales)
    nan = (data & 0x7F) == 0x7F
    if bool(nan.any()):
        raise ValueError(f"data holds {int(nan.sum())} e4m3fn NaN code(s) (0x7F/0xFF); refusing to convert")
    return torch.where(data == 0x80, 0, data).to(torch.uint8), scales * 2


def fnuz_to_fn(data: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3fnuz page -> e4m3fn page. data [..., head_dim], scales broadcastable per row [..., 1].

    Rows without +-240 (0x7F/0xFF; never written by our fnuz encoder): bytes kept, scale halved
    (exact). Rows with +-240 (a foreign encoder that saturates at 240): scale kept and each value
    re-encoded as e4m3fn; exact unless the row also holds an odd subnormal m*2^-10 (m = 1, 3, 5, 7),
    which e4m3fn lacks -- those round to nearest even (|error| <= 2^-10 * scale).
    NaN (0x80) raises ValueError.
    """
    _check_bridge_args(data, scales)
    nan = data == 0x80
    if bool(nan.any()):
        raise ValueError(f"data holds {int(nan.sum())} e4m3fnuz NaN code(s) (0x80); refusing to convert")
    is_max = (data & 0x7F) == 0x7F
    # per-row scales re-encode only the rows holding +-240; one shared scale decides for all rows
    wide = is_max.any(-1, keepdim=True) if scales.dim() == data.dim() else is_max.any()
    if not bool(wide.any()):
        return data.clone(), scales / 2
    reenc = decode_lut(True, data.device)[data.long()].to(torch.float8_e4m3fn).view(torch.uint8)
    reenc = torch.where(reenc == 0x80, 0, reenc).to(torch.uint8)
    return torch.where(wide, reenc, data), torch.where(wide, scales, scales / 2)
