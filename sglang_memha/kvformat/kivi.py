"""int4_kivi: K per channel over blocks of 32 tokens (KIVI), V per token in groups of 32 (int4_g32).

``int4_kivi_g64`` has the same K (this codec, byte for byte) and int4_g64's V (groups of 64): its
V scale rows are D/16 B instead of D/8, 0.297 of bf16 instead of 0.3125 (``spec.SIDE_FORMATS``).

Why: SmolLM2's int4 loss is nearly all K, whose channels carry large per-channel offsets that eat a
per-token range. Grouping K along tokens per channel (KIVI, Liu et al. 2024) keeps each channel's
offset in its own min; measured offline on SmolLM2 (eval/RESULTS.md) it is the only candidate that
meets issue 7's int4 goals. It is not token-local: a block's K scales exist only once its 32 tokens
do, so the producer keeps an open block's rows in bf16 until the block fills (KIVI's residual).

K of one block of B = 32 token slots (slot s belongs to block s // B, so a page of a multiple of B
slots holds whole blocks), per (block, kv-head, channel c), with the int4 rule of ``intq``:

    min_b[c]   = bf16 rounded toward -inf of min over the block's 32 tokens
    scale_b[c] = bf16 rounded toward +inf of (max - min_b[c]) / 15   (zeros are +0)
    q          = clamp(RNE((x - min_b[c]) / scale_b[c]), 0, 15)       (0 where scale_b == 0)
    x_hat      = q * scale_b[c] + min_b[c]  (fp32 mul, then add);  |x - x_hat| <= scale_b[c] / 2

Bytes per (token, kv-head) row, same size as int4_g32's so one row layout serves K and V:

    data  [D/2]  uint8  codes, channel 2i in the low nibble, 2i+1 in the high nibble
    scale [D/8]  uint8  = D/32 (scale_b, min_b) bf16 pairs: row r of a block (r = s mod 32)
                         holds channels [r * D/32, (r + 1) * D/32) of the block's table

As tensors (FlashInfer style): x [T, H, D] with T a multiple of 32 and tokens in slot order,
data [T, H, D/2] uint8, scales [T, H, D/32, 2] bf16 (the same shape as int4_g32's).
"""

from __future__ import annotations

import torch

from sglang_memha.kvformat.base import KVCodec, check_input, check_out_dtype
from sglang_memha.kvformat.intq import int4_codes, int4_scale_min, pack_int4, unpack_int4
from sglang_memha.kvformat.spec import KVFormat

BLOCK = 32  # tokens per K block; = FORMAT_SPECS[INT4_KIVI].group_size


def spread_table(scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Per-block tables (scale_b, min_b) [NB, H, D] bf16 each -> scale rows [NB * 32, H, D/32, 2]:
    channel c = r * D/32 + j goes to row r of its block."""
    nb, h, d = scale.shape
    table = torch.stack([scale, lo], dim=-1).reshape(nb, h, BLOCK, d // BLOCK, 2).permute(0, 2, 1, 3, 4)
    return table.reshape(nb * BLOCK, h, d // BLOCK, 2)


def gather_table(scales: torch.Tensor) -> torch.Tensor:
    """Inverse of ``spread_table``: scale rows [NB * 32, H, D/32, 2] -> [NB, H, D, 2]."""
    t, h, per, _ = scales.shape
    nb = t // BLOCK
    return scales.reshape(nb, BLOCK, h, per, 2).permute(0, 2, 1, 3, 4).reshape(nb, h, per * BLOCK, 2)


class Int4KiviKCodec(KVCodec):
    """K of int4_kivi and int4_kivi_g64. ``get_codec("int4_kivi", role="v")`` is the int4_g32 codec,
    ``get_codec("int4_kivi_g64", role="v")`` the int4_g64 codec."""

    fmt = KVFormat.INT4_KIVI
    scale_dtype = torch.bfloat16

    def scale_shape(self, num_tokens, num_kv_heads, head_dim):
        return (num_tokens, num_kv_heads, head_dim // BLOCK, 2)

    @staticmethod
    def check_blocks(num_tokens: int) -> int:
        """Number of whole blocks in ``num_tokens``; raises if there is a partial one."""
        if num_tokens % BLOCK:
            raise ValueError(
                f"int4_kivi K: num_tokens={num_tokens} is not a multiple of the {BLOCK}-token block; "
                f"K scales are per (block, head, channel), so K is coded one whole block at a time "
                f"(keep the open block's rows in bf16 until it fills)")
        return num_tokens // BLOCK

    def quantize(self, x):
        """x [T, H, D] (T a multiple of 32, slot order) -> (data [T, H, D/2] uint8,
        scales [T, H, D/32, 2] bf16)."""
        x32 = check_input(x, self.spec)
        t, h, d = x32.shape
        nb = self.check_blocks(t)
        blocks = x32.reshape(nb, BLOCK, h, d)
        scale, lo = int4_scale_min(blocks.amin(1), blocks.amax(1))  # [NB, H, D] each
        q = int4_codes(blocks, scale[:, None], lo[:, None]).reshape(t, h, d)
        return pack_int4(q), spread_table(scale, lo)

    def quantize_blocks(self, blocks: torch.Tensor, fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code blocks of which only the first ``fill`` rows are written (the open block of a
        prompt or of a sequence being decoded).

        blocks [NB, 32, H, D] bf16/fp16/fp32 (rows >= fill are ignored), fill [NB] int in 1..32
        -> (data [NB * 32, H, D/2] uint8, scales [NB * 32, H, D/32, 2] bf16). Each block's
        min/max run over its first ``fill`` rows; rows >= fill get zero codes and still carry
        their share of the table. With fill = 32 this is ``quantize``."""
        nb, b, h, d = blocks.shape
        if b != BLOCK:
            raise ValueError(f"int4_kivi K: blocks.shape={tuple(blocks.shape)}: expected [NB, {BLOCK}, H, D]")
        fill = fill.to(device=blocks.device, dtype=torch.long)
        if fill.shape != (nb,) or (nb and not bool(((fill >= 1) & (fill <= BLOCK)).all())):
            raise ValueError(f"int4_kivi K: fill must be [{nb}] ints in 1..{BLOCK}, got {fill.tolist()}")
        written = (torch.arange(BLOCK, device=blocks.device)[None, :] < fill[:, None])[..., None, None]
        x32 = check_input(torch.where(written, blocks, 0).reshape(nb * b, h, d), self.spec, "blocks")
        x32 = x32.reshape(nb, b, h, d)
        inf = torch.tensor(float("inf"), device=blocks.device)
        lo32 = torch.where(written, x32, inf).amin(1)
        hi32 = torch.where(written, x32, -inf).amax(1)
        scale, lo = int4_scale_min(lo32, hi32)  # [NB, H, D] each
        q = int4_codes(x32, scale[:, None], lo[:, None]) * written  # unwritten rows: code 0
        return pack_int4(q.reshape(nb * b, h, d)), spread_table(scale, lo)

    def dequantize(self, data, scales, out_dtype=torch.bfloat16):
        """(data, scales) of whole blocks -> x_hat [T, H, D] in ``out_dtype``."""
        d = self.check_data(data, scales)
        check_out_dtype(out_dtype)
        t, h = data.shape[:2]
        nb = self.check_blocks(t)
        table = gather_table(scales.float())
        q = unpack_int4(data).float().reshape(nb, BLOCK, h, d)
        return (q * table[:, None, ..., 0] + table[:, None, ..., 1]).reshape(t, h, d).to(out_dtype)

    def quantize_into(self, x, loc, data_pool, scale_pool):
        """As ``KVCodec.quantize_into``, for ``loc`` made of whole aligned blocks in slot order."""
        nb = self.check_blocks(loc.numel())
        blocks = loc.reshape(nb, BLOCK).long()
        aligned = (blocks[:, 0] % BLOCK == 0) & (blocks == blocks[:, :1] + torch.arange(BLOCK, device=loc.device)).all(1)
        if not bool(aligned.all()):
            bad = int((~aligned).nonzero()[0])
            raise ValueError(
                f"int4_kivi K: loc[{bad * BLOCK}:{(bad + 1) * BLOCK}] is not one aligned block of {BLOCK} "
                f"consecutive slots starting at a multiple of {BLOCK}")
        super().quantize_into(x, loc, data_pool, scale_pool)

    def gather_dequantize(self, data_pool, scale_pool, page_ids, page_size, out_dtype=torch.bfloat16, **kw):
        if page_size % BLOCK:
            raise ValueError(f"int4_kivi: page_size={page_size} must be a multiple of the {BLOCK}-token K block")
        return super().gather_dequantize(data_pool, scale_pool, page_ids, page_size, out_dtype, **kw)
