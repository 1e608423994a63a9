"""Integer codecs: int8 symmetric per (token, kv-head); int4 asymmetric per (token, kv-head, group).

int8   scale = amax_row / 127 (fp32); q = clamp(round_half_even(x / scale), -127, 127) stored as
       two's complement (-128 is never written); x_hat = q * scale. |x - x_hat| <= scale / 2.

int4   per group of G (32 or 64) consecutive elements of head_dim:
       min_b   = bf16 rounded toward -inf of min(group)
       scale_b = bf16 rounded toward +inf of (max(group) - min_b) / 15   (fp32 arithmetic)
       (a zero min_b or scale_b is +0, never -0)
       q       = clamp(round_half_even((x - min_b) / scale_b), 0, 15)   (0 when scale_b == 0)
       x_hat   = q * scale_b + min_b.   |x - x_hat| <= scale_b / 2.
       Two codes per byte: element 2i in the low nibble, element 2i+1 in the high nibble.
       Scales [T, H, G_count, 2] bf16 = (scale_b, min_b) per group, little-endian.
Directed rounding makes every group fit [min_b, min_b + 15 * scale_b], so the bound holds
without clamping error; a constant group is reproduced exactly when its value is bf16.
"""

from __future__ import annotations

import torch

from sglang_memha.kvformat.base import KVCodec, bf16_round, check_input, check_out_dtype
from sglang_memha.kvformat.spec import KVFormat


class Int8Codec(KVCodec):
    """int8: int8 codes, one fp32 scale per (token, kv-head) = amax / 127."""

    fmt = KVFormat.INT8
    scale_dtype = torch.float32

    def scale_shape(self, num_tokens, num_kv_heads, head_dim):
        return (num_tokens, num_kv_heads, 1)

    def quantize(self, x):
        x32 = check_input(x, self.spec)
        scale = div_rn(x32.abs().amax(-1, keepdim=True), 127.0)
        safe = torch.where(scale > 0, scale, 1.0)
        q = torch.round(x32 / safe).clamp_(-127, 127)
        return q.to(torch.int8).view(torch.uint8), scale

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        """x = int8(data) * scale (fp32), rounded to out_dtype."""
        self.check_data(data, scales)
        check_out_dtype(out_dtype)
        return (data.view(torch.int8).float() * scales).to(out_dtype)


def div_rn(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b correctly rounded on every device: torch on CUDA turns a division by a Python scalar
    into a multiplication by its reciprocal (off by an ulp at times: a GPU run found int8 and int4
    scales differing from CPU's); a tensor divisor is a true division."""
    return torch.div(a, torch.full_like(a, b))


def _plus_zero(x32: torch.Tensor) -> torch.Tensor:
    return torch.where(x32 == 0, 0.0, x32)


def int4_scale_min(lo32: torch.Tensor, hi32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A group's fp32 min and max -> (scale_b, min_b) bf16 by the int4 rule (module docstring);
    shared by int4_g32/g64 (groups along head_dim) and int4_kivi's K (groups along tokens)."""
    # Zeros are +0: which zero a min or max of {-0, +0} returns is up to the implementation
    # (torch, Triton on GPU differ), so the spec fixes it and both write 0x0000.
    lo = bf16_round(_plus_zero(lo32), up=False)
    scale = bf16_round(_plus_zero(div_rn(hi32 - lo.float(), 15.0)), up=True)
    return scale, lo


def int4_codes(x32: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """clamp(RNE((x - min_b) / scale_b), 0, 15) as uint8 (0 where scale_b == 0); scale/lo
    broadcast against x32."""
    s32 = scale.float()
    safe = torch.where(s32 > 0, s32, 1.0)
    return torch.round((x32 - lo.float()) / safe).clamp_(0, 15).to(torch.uint8)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[..., D] codes 0..15 -> [..., D/2] uint8: element 2i in the low nibble, 2i+1 in the high."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(data: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: [..., D/2] uint8 -> [..., D] uint8 codes 0..15."""
    return torch.stack([data & 0xF, data >> 4], dim=-1).reshape(*data.shape[:-1], data.shape[-1] * 2)


class _Int4(KVCodec):
    group: int
    scale_dtype = torch.bfloat16

    def scale_shape(self, num_tokens, num_kv_heads, head_dim):
        return (num_tokens, num_kv_heads, head_dim // self.group, 2)

    def quantize(self, x):
        x32 = check_input(x, self.spec)
        t, h, d = x32.shape
        g = x32.reshape(t, h, d // self.group, self.group)
        scale, lo = int4_scale_min(g.amin(-1), g.amax(-1))
        q = int4_codes(g, scale[..., None], lo[..., None]).reshape(t, h, d)
        return pack_int4(q), torch.stack([scale, lo], dim=-1)

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        """x = uint4(data) * scale + min per group (fp32 mul, then add), rounded to out_dtype."""
        head_dim = self.check_data(data, scales)
        check_out_dtype(out_dtype)
        t, h = data.shape[:2]
        q = unpack_int4(data).float().reshape(t, h, head_dim // self.group, self.group)
        sc = scales.float()
        return (q * sc[..., 0:1] + sc[..., 1:2]).reshape(t, h, head_dim).to(out_dtype)


class Int4G32Codec(_Int4):
    fmt = KVFormat.INT4_G32
    group = 32


class Int4G64Codec(_Int4):
    fmt = KVFormat.INT4_G64
    group = 64
