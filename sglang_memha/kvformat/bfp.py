"""bfp8: block floating point, 16 elements share one 8-bit exponent (Tenstorrent's bfp8 numerics).

Per block of 16 consecutive head_dim elements:
    E   = floor(log2(max |x|)) of the block (exact, from frexp); all-zero block: exponent byte 0
    exp = clamp(E + 127, 0, 255)                      -> one uint8 (e8m0-style, bias 127)
    mag = min(round_half_even(|x| * 2^(6 - (exp - 127))), 127)   7-bit magnitude
    byte = (sign << 7) | mag, sign = 1 only when x < 0 and mag > 0 (no negative zero)
    x_hat = (-1)^sign * mag * 2^(exp - 133)
|x - x_hat| <= 2^(exp - 133) (one mantissa step = amax / 64 at most); elements that do not
saturate at 127 are within half a step. This is the numeric form of Tenstorrent's bfp8_b (sign +
7-bit mantissa with explicit leading bit, shared exponent per 16); the byte layout here is ours
(NHD rows, exponents in the companion scale buffer), not Tenstorrent's tile layout.
"""

from __future__ import annotations

import torch

from sglang_memha.kvformat.base import KVCodec, check_input, check_out_dtype
from sglang_memha.kvformat.spec import KVFormat

BLOCK = 16


def pow2(n: torch.Tensor) -> torch.Tensor:
    """Exact fp32 2^n for int32 n in [-252, 252] whose result is representable (two halves)."""
    a = torch.div(n, 2, rounding_mode="floor")
    return _pow2_normal(a) * _pow2_normal(n - a)


def _pow2_normal(n: torch.Tensor) -> torch.Tensor:
    return ((n.to(torch.int32) + 127) << 23).view(torch.float32)


class Bfp8Codec(KVCodec):
    fmt = KVFormat.BFP8
    scale_dtype = torch.uint8

    def scale_shape(self, num_tokens, num_kv_heads, head_dim):
        return (num_tokens, num_kv_heads, head_dim // BLOCK)

    def quantize(self, x):
        x32 = check_input(x, self.spec)
        t, h, d = x32.shape
        b = x32.reshape(t, h, d // BLOCK, BLOCK)
        amax = b.abs().amax(-1)
        _, e = torch.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)  =>  floor(log2 amax) = e - 1
        exp = torch.where(amax > 0, e.to(torch.int32) - 1 + 127, 0).clamp_(0, 255)
        shift = (133 - exp)[..., None]  # |x| * 2^shift < 128; two exact power-of-two factors
        half = torch.div(shift, 2, rounding_mode="floor")
        mag = torch.round(b.abs() * _pow2_normal(half) * _pow2_normal(shift - half)).clamp_(max=127).to(torch.uint8)
        sign = ((b < 0) & (mag > 0)).to(torch.uint8) << 7
        return (sign | mag).reshape(t, h, d), exp.to(torch.uint8)

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        """x = (-1)^sign * mag * 2^(exp - 133) in fp32 (exact), rounded to out_dtype."""
        head_dim = self.check_data(data, scales)
        check_out_dtype(out_dtype)
        t, h = data.shape[:2]
        blk = data.reshape(t, h, head_dim // BLOCK, BLOCK)
        mag = (blk & 0x7F).float()
        signed = torch.where(blk >= 0x80, -mag, mag)
        step = pow2(scales.to(torch.int32) - 133)
        return (signed * step[..., None]).reshape(t, h, head_dim).to(out_dtype)
