"""Triton JIT source of the paged decode attention (``decode.py`` loads it lazily).

Kept apart so ``decode.py`` imports without Triton; jit functions must be module-level.

Stage 1: one program per (batch, kv_head, split) serves the GROUP q heads of that KV head
(rows of a [BLOCK_H, BLOCK_D] q tile, BLOCK_H >= 16 for ``tl.dot``); it walks its split's tokens
BLOCK_N at a time, reading each token's code row and scale row by its slot id, and keeps an
online softmax in base 2 (logits pre-multiplied by log2(e)). It writes the split's normalized
output ``acc / sum`` and ``lse = max + log2(sum)``. Stage 2 merges the splits of one (batch,
q head). Both stages get a split's token range from ``_split_range``, so an empty split (short
sequence) is skipped by both without a marker.

Dequantization inside the loop (MODE):
    0 bf16       the data buffer viewed as bf16 by the launcher: loaded as is
    1 fp8 fn     codes -> e4m3fn values (exact), per-(token, head) bf16 scale
    2 fp8 fnuz   codes -> e4m3fnuz values (exact), per-(token, head) bf16 scale
    3 int8       codes -> int8 values (exact), per-(token, head) fp32 scale
    4 int4       low nibble = element 2i, high = 2i + 1; per group (scale, min) bf16:
                 x = q * scale + min, applied to the tile (fp32)
For MODE 1-3 the code values are exact in bf16/fp16/fp32, so the dots run on codes and the
per-token scale is applied outside them: K's to the logit row (q . (c s) = s (q . c)), V's to the
softmax weights (sum_n p_n s_n c_n); the softmax sum uses the unscaled weights.
"""

import triton
import triton.language as tl

from sglang_memha.kvformat._triton_jit import _e4m3_decode

LOG2E = 1.4426950408889634


@triton.jit
def _split_range(seq_len, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    # tokens [start, end) of `split`: splits hold a whole number of BLOCK_N tiles
    per = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = per * split
    return start, tl.minimum(start + per, seq_len)


@triton.jit
def _fp8_values(byte, FNUZ: tl.constexpr, HW: tl.constexpr):
    # int32 code bytes -> fp32 e4m3fn / e4m3fnuz values, exact (no scale)
    if HW:
        val = byte.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        if FNUZ:
            # fnuz(c) = fn(c) / 2 except 0x7F / 0xFF (fn's NaN, fnuz's +-240; never written)
            val = tl.where((byte & 0x7F) == 0x7F, tl.where(byte >= 128, -240.0, 240.0), val * 0.5)
        return val
    elif FNUZ:
        return _e4m3_decode(byte, 8)
    else:
        return _e4m3_decode(byte, 7)


@triton.jit
def _code_tile(data_ptr, row, nmask, D: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr,
               HW: tl.constexpr):
    # MODE 0-3: [BLOCK_N, BLOCK_D] fp32 values of the rows starting at element offsets `row`
    # ([BLOCK_N] int64), before any scale; columns >= D and masked rows are 0
    offs = tl.arange(0, BLOCK_D)[None, :]
    mask = nmask[:, None] & (offs < D)
    if MODE == 0:
        val = tl.load(data_ptr + row[:, None] + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        byte = tl.load(data_ptr + row[:, None] + offs, mask=mask, other=0).to(tl.int32)
        if MODE == 3:
            val = tl.where(byte >= 128, byte - 256, byte).to(tl.float32)
        else:
            val = _fp8_values(byte, MODE == 2, HW)
    return val


@triton.jit
def _int4_tile(data_ptr, scale_ptr, drow, srow, nmask, NG: tl.constexpr, NG_P2: tl.constexpr,
               GS: tl.constexpr, BLOCK_N: tl.constexpr):
    # MODE 4: [BLOCK_N, NG_P2 * GS] fp32 dequantized values; the bytes as a [BLOCK_N, groups,
    # GS / 2] tile, each group's (scale, min) loaded once, low and high nibbles joined back into
    # element order (2i, 2i + 1); groups >= NG and masked rows are 0
    HALF: tl.constexpr = GS // 2
    gi = tl.arange(0, NG_P2)[None, :, None]
    pi = tl.arange(0, HALF)[None, None, :]
    byte = tl.load(data_ptr + drow[:, None, None] + gi * HALF + pi,
                   mask=nmask[:, None, None] & (gi < NG) & (pi < HALF), other=0).to(tl.int32)
    g1 = tl.arange(0, NG_P2)[None, :]
    sp = scale_ptr + srow[:, None] + g1 * 2
    gmask = nmask[:, None] & (g1 < NG)
    s = tl.load(sp, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
    z = tl.load(sp + 1, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
    lo = (byte & 0xF).to(tl.float32) * s + z
    hi = (byte >> 4).to(tl.float32) * s + z
    return tl.reshape(tl.join(lo, hi), (BLOCK_N, NG_P2 * GS))


@triton.jit
def _decode_stage1(
    q_ptr, kd_ptr, ks_ptr, vd_ptr, vs_ptr, indptr_ptr, indices_ptr, mid_o_ptr, mid_lse_ptr,
    qk_scale, sm_scale,
    sq_b, sq_h, skd_t, skd_h, sks_t, sks_h, svd_t, svd_h, svs_t, svs_h,
    smo_b, smo_h, smo_s, sml_b, sml_h,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, MODE: tl.constexpr,
    NG: tl.constexpr, NG_P2: tl.constexpr, GS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, HW: tl.constexpr, LOGIT_CAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    first = tl.load(indptr_ptr + b).to(tl.int64)
    seq_len = (tl.load(indptr_ptr + b + 1) - first).to(tl.int32)
    start, end = _split_range(seq_len, split, NUM_SPLITS, BLOCK_N)
    if end > start:
        hi = tl.arange(0, BLOCK_H)
        hmask = hi < GROUP
        heads = kvh * GROUP + hi  # q heads of this KV head
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :],
                    mask=hmask[:, None] & dmask[None, :], other=0.0).to(DOT_DTYPE)
        m = tl.zeros([BLOCK_H], dtype=tl.float32) - float("inf")
        l = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            slot = tl.load(indices_ptr + first + offs_n, mask=nmask, other=0).to(tl.int64)
            # ---- logits: q . k, K's per-token scale on the row ----
            if MODE == 4:
                k = _int4_tile(kd_ptr, ks_ptr, slot * skd_t + kvh * skd_h, slot * sks_t + kvh * sks_h,
                               nmask, NG, NG_P2, GS, BLOCK_N)
            else:
                k = _code_tile(kd_ptr, slot * skd_t + kvh * skd_h, nmask, D, BLOCK_D, MODE, HW)
            qk = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision="ieee", out_dtype=tl.float32)
            if MODE == 1 or MODE == 2 or MODE == 3:
                sk = tl.load(ks_ptr + slot * sks_t + kvh * sks_h, mask=nmask, other=0.0).to(tl.float32)
                qk = qk * sk[None, :]
            # soft-capping (Gemma-2 style): cap * tanh(x / cap) of the scaled logit x, as SGLang's
            # kernels; tanh(y) = 2 sigmoid(2y) - 1, which every Triton version has
            if LOGIT_CAP > 0:
                qk = (LOGIT_CAP * (2.0 * tl.sigmoid(2.0 * (qk * sm_scale) / LOGIT_CAP) - 1.0)) * (qk_scale / sm_scale)
            else:
                qk = qk * qk_scale
            # padded q rows (h >= GROUP) are zeros: finite logits, never stored
            qk = tl.where(nmask[None, :], qk, float("-inf"))
            # ---- online softmax (base 2) ----
            m_new = tl.maximum(m, tl.max(qk, 1))
            alpha = tl.exp2(m - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            # ---- p . v, V's per-token scale on p ----
            if MODE == 4:
                v = _int4_tile(vd_ptr, vs_ptr, slot * svd_t + kvh * svd_h, slot * svs_t + kvh * svs_h,
                               nmask, NG, NG_P2, GS, BLOCK_N)
            else:
                v = _code_tile(vd_ptr, slot * svd_t + kvh * svd_h, nmask, D, BLOCK_D, MODE, HW)
            if MODE == 1 or MODE == 2 or MODE == 3:
                sv = tl.load(vs_ptr + slot * svs_t + kvh * svs_h, mask=nmask, other=0.0).to(tl.float32)
                pv = p * sv[None, :]
            else:
                pv = p
            acc = acc * alpha[:, None] + tl.dot(pv.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision="ieee",
                                                out_dtype=tl.float32)
            m = m_new
        mo = mid_o_ptr + b * smo_b + heads[:, None] * smo_h + split * smo_s + offs_d[None, :]
        tl.store(mo, acc / l[:, None], mask=hmask[:, None] & dmask[None, :])
        tl.store(mid_lse_ptr + b * sml_b + heads * sml_h + split, m + tl.log2(l), mask=hmask)


@triton.jit
def _decode_stage2(
    mid_o_ptr, mid_lse_ptr, o_ptr, indptr_ptr,
    smo_b, smo_h, smo_s, sml_b, sml_h, so_b, so_h,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):
    # one program per (batch, q head): merge the non-empty splits; an empty sequence gives 0
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    seq_len = (tl.load(indptr_ptr + b + 1) - tl.load(indptr_ptr + b)).to(tl.int32)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    # m and l kept as [BLOCK_D] vectors (all lanes equal) so every value is a tensor
    m = tl.full([BLOCK_D], -float("inf"), tl.float32)
    l = tl.zeros([BLOCK_D], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        start, end = _split_range(seq_len, split, NUM_SPLITS, BLOCK_N)
        if end > start:
            lse = tl.load(mid_lse_ptr + b * sml_b + h * sml_h + split)
            part = tl.load(mid_o_ptr + b * smo_b + h * smo_h + split * smo_s + offs_d, mask=dmask, other=0.0)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * part
            l = l * alpha + w
            m = m_new
    out = acc / tl.maximum(l, 1e-30)  # acc = 0 where l = 0
    tl.store(o_ptr + b * so_b + h * so_h + offs_d, out.to(o_ptr.dtype.element_ty), mask=dmask)
