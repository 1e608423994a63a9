"""bf16: the baseline. data = the bf16 bit patterns of x (little-endian), no scales."""

from __future__ import annotations

import torch

from sglang_memha.kvformat.base import KVCodec, check_input, check_out_dtype
from sglang_memha.kvformat.spec import KVFormat


class Bf16Codec(KVCodec):
    fmt = KVFormat.BF16

    def quantize(self, x):
        """data = bf16_rne(x) as bytes [T, H, 2 * head_dim]; exact for bf16 input."""
        check_input(x, self.spec)
        t, h, d = x.shape
        return x.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(t, h, 2 * d), None

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        head_dim = self.check_data(data, scales)
        check_out_dtype(out_dtype)
        t, h = data.shape[:2]
        return data.contiguous().view(torch.bfloat16).reshape(t, h, head_dim).to(out_dtype)

    def gather_rows_fused(self, data_pool, scale_pool, slots, head_dim, out_dtype):
        """The rows are the bf16 values: one gather of 2-byte elements (torch's uint8 index kernel
        moves a byte at a time, about half as fast)."""
        if out_dtype != torch.bfloat16 or data_pool.shape[-1] != 2 * head_dim or not data_pool.is_contiguous():
            return None
        return data_pool.view(torch.bfloat16)[slots]

    def fused_row_reader(self, data_pool, scale_pool, head_dim, out_dtype):
        if out_dtype != torch.bfloat16 or data_pool.shape[-1] != 2 * head_dim or not data_pool.is_contiguous():
            return lambda slots: None
        return data_pool.view(torch.bfloat16).__getitem__  # the checks and the view, once
