"""Analytic round-trip error bounds per format (the same statements as docs/kv_format.md)."""

from __future__ import annotations

import torch

from sglang_memha.kvformat import KVFormat, get_codec
from sglang_memha.kvformat.fp8 import FNUZ_CLAMP, E4M3FN_MAX, S_MIN_FN, S_MIN_FNUZ


def max_excess(fmt: KVFormat, x: torch.Tensor, layer_scale: float = 1.0) -> float:
    """max over elements of |x - x_hat| - bound; <= 0 means every element is within its bound.

    x [T, H, D] (any input dtype); x_hat is dequantized to fp32. fp8 and int8 state their fp32
    rounding terms exactly (no slack); for the others ``slack`` absorbs fp32 rounding of the scale
    arithmetic (2^-20 of the row/group magnitude).
    """
    codec = get_codec(fmt)
    if fmt == KVFormat.FP8_E4M3_TENSOR:
        data, scales = codec.quantize(x, layer_scale)
    else:
        data, scales = codec.quantize(x)
    x32 = x.float()
    err = (codec.dequantize(data, scales, torch.float32) - x32).abs()
    amax = x32.abs().amax(-1, keepdim=True)
    slack = 2.0**-20 * amax
    if fmt == KVFormat.BF16:
        # 8 significant bits: relative 2^-8; below bf16's smallest normal, half its 2^-133 step
        bound = torch.clamp_min(x32.abs() * 2.0**-8, 2.0**-134)
        slack = torch.zeros_like(slack)
    elif fmt in (KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ):
        # 3 mantissa bits: relative 2^-4 for normals; half the subnormal step below
        s = scales.float()
        fn = fmt == KVFormat.FP8_E4M3
        c, s_min = (E4M3FN_MAX, S_MIN_FN) if fn else (FNUZ_CLAMP, S_MIN_FNUZ)
        # the bf16 scale: s = max(bf16_up(fp32(amax / C)), S_MIN), so amax <= C s up to fp32 rounding,
        # and s exceeds amax / C by at most one bf16 rounding (2^-7) unless it is the floor S_MIN
        assert bool((amax <= c * s * (1 + 2.0**-22)).all())
        assert bool(((s <= amax / c * (1 + 2.0**-7) * (1 + 2.0**-22)) | (s == s_min)).all())
        sub_half = 2.0**-10 if fn else 2.0**-11
        # plus the fp32 roundings of r = 1 / s and of x * r: |x| (2^-23 + 2^-27 + ...) <= |x| 2^-22
        bound = torch.maximum(x32.abs() * 2.0**-4, s * sub_half) + x32.abs() * 2.0**-22
        slack = torch.zeros_like(slack)
    elif fmt == KVFormat.FP8_E4M3_TENSOR:
        # as fp8_e4m3 with the layer scale; a bf16/fp16 input is divided in its own dtype first
        rel = 2.0**-4 if x.dtype == torch.float32 else 2.0**-4 + 2.0**-7
        bound = torch.maximum(x32.abs() * rel, torch.full_like(x32, layer_scale * 2.0**-10))
    elif fmt == KVFormat.INT8:
        # scale / 2, plus the fp32 roundings of x / scale and of q * scale (2^-24 relative each):
        # |x| 2^-22 covers both; 2^-143 = 128 * 2^-150 when the scale is an fp32 subnormal (it is
        # then off amax / 127 by up to 2^-150, so x / scale may clamp at 127, or the scale be 0)
        bound = scales / 2 + x32.abs() * 2.0**-22 + 2.0**-143
        slack = torch.zeros_like(slack)
    elif fmt in (KVFormat.INT4_G32, KVFormat.INT4_G64):
        t, h, d = x.shape
        gs = codec.spec.group_size
        s_b = scales[..., 0].float()
        g = x32.reshape(t, h, d // gs, gs)
        lo, hi = g.amin(-1), g.amax(-1)
        # the stored scale itself is bounded analytically (directed bf16 rounding, 8 bits)
        s_max = ((hi - lo) + lo.abs() * 2.0**-7) / 15 * (1 + 2.0**-7)
        assert bool((s_b <= s_max * (1 + 2.0**-20) + 1e-30).all()), "int4 stored scale exceeds its analytic bound"
        # half a step, plus the fp32 roundings of x - min_b and of the quotient ((x - min_b) / scale_b
        # <= 15: 15 * 2^-23 of a step) and of the final add (|x_hat| 2^-24, or 2^-150 if subnormal)
        s_el = s_b[..., None].expand(t, h, d // gs, gs).reshape(t, h, d)
        bound = s_el * (0.5 + 2.0**-19) + x32.abs() * 2.0**-24 + 2.0**-150
        slack = torch.zeros_like(slack)
    elif fmt == KVFormat.BFP8:
        t, h, d = x.shape
        step = torch.pow(2.0, scales.double() - 133).float()  # one mantissa step per block
        mag = (data & 0x7F).reshape(t, h, d // 16, 16)
        half = torch.where(mag < 127, 0.5, 1.0)  # saturated elements may be off by one step
        bound = (half * step[..., None]).reshape(t, h, d)
        slack = torch.zeros_like(slack)
        # and the step itself: <= amax_block / 64
        amax_b = x32.reshape(t, h, d // 16, 16).abs().amax(-1)
        assert bool((step <= torch.maximum(amax_b / 64, torch.full_like(amax_b, 2.0**-133))).all())
    else:
        raise AssertionError(fmt)
    return float((err - bound - slack).max())
