"""Triton JIT source for ``triton_kernels`` (imported only through its lazy loader).

Kept apart so that ``triton_kernels`` imports without Triton; jit functions must be module-level.
"""

import triton
import triton.language as tl


@triton.jit
def _pow2(n):
    # exact fp32 2^n for int32 n in [-126, 127]
    return ((n + 127) << 23).to(tl.float32, bitcast=True)

@triton.jit
def _rne(t):
    # round half to even of t >= 0 (t < 2^23) -> int32
    f = tl.floor(t)
    d = t - f
    fi = f.to(tl.int32)
    up = (d > 0.5) | ((d == 0.5) & ((fi & 1) == 1))
    return fi + up.to(tl.int32)

@triton.jit
def _bf16_directed(v, UP: tl.constexpr):
    # fp32 -> value of the bf16 rounded toward +inf (UP) or -inf, still as fp32
    bits = v.to(tl.int32, bitcast=True)
    neg = bits < 0
    if UP:
        bump = ((bits & 0xFFFF) != 0) & (~neg)
    else:
        bump = ((bits & 0xFFFF) != 0) & neg
    return ((bits & -65536) + bump.to(tl.int32) * 65536).to(tl.float32, bitcast=True)

@triton.jit
def _e4m3_encode(y, BIAS: tl.constexpr):
    # |y| within range; RNE; -> int32 code, zero always 0x00
    a = tl.abs(y)
    sub = _rne(a * _pow2(tl.full(a.shape, BIAS + 2, tl.int32)))
    bits = a.to(tl.int32, bitcast=True)
    nrm = ((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) - ((127 - BIAS) << 3)
    code = tl.where(a < _pow2(tl.full(a.shape, 1 - BIAS, tl.int32)), sub, nrm)
    neg = (y < 0) & (code > 0)
    return code | (neg.to(tl.int32) << 7)

@triton.jit
def _e4m3_decode(code, BIAS: tl.constexpr):
    e = (code >> 3) & 0xF
    m = code & 7
    sub = m.to(tl.float32) * _pow2(tl.full(code.shape, -BIAS - 2, tl.int32))
    nrm = (m + 8).to(tl.float32) * _pow2(e - BIAS - 3)
    mag = tl.where(e == 0, sub, nrm)
    return tl.where(code >= 128, -mag, mag)

@triton.jit
def _quant_row_kernel(
    x_ptr, loc_ptr, data_ptr, scale_ptr,
    sx_t, sx_h, sd_t, sd_h, ss_t, ss_h,
    D: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr, QMAX: tl.constexpr, SMIN_BITS: tl.constexpr,
):
    # fp8 fn / fnuz (bf16 scale) and int8 (fp32 scale): one scale per (token, head)
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + t * sx_t + h * sx_h + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    slot = tl.load(loc_ptr + t)
    if MODE == 2:
        scale = tl.math.div_rn(amax, QMAX)
        safe = tl.where(scale > 0, scale, 1.0)
        y = tl.math.div_rn(x, tl.zeros_like(x) + safe)
        y = tl.where(scale > 0, y, 0.0)
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        q = tl.minimum(_rne(tl.abs(y)), 127)
        code = tl.where(y < 0, -q, q) & 0xFF
        tl.store(scale_ptr + slot * ss_t + h * ss_h, scale)
    else:
        # s = max(bf16_up(fp32(amax / QMAX)), S_MIN) (fp8.fp8_row_scale): round the quotient's bits
        # up to bf16; r = fp32(1 / s) is finite (s >= 2^-126) and |x r| <= QMAX (1 + 2^-22)
        sb = (tl.math.div_rn(amax, QMAX).to(tl.int32, bitcast=True) + 0xFFFF) & -65536
        s = tl.maximum(sb, SMIN_BITS).to(tl.float32, bitcast=True)
        y = x * tl.math.div_rn(s * 0.0 + 1.0, s)
        if MODE == 1:
            code = _e4m3_encode(y, 8)
        else:
            code = _e4m3_encode(y, 7)
        tl.store(scale_ptr + slot * ss_t + h * ss_h, s.to(tl.bfloat16))
    tl.store(data_ptr + slot * sd_t + h * sd_h + offs, code.to(tl.uint8), mask=mask)

@triton.jit
def _quant_int4_kernel(
    x_ptr, loc_ptr, data_ptr, scale_ptr,
    sx_t, sx_h, sd_t, sd_h, ss_t, ss_h,
    NG: tl.constexpr, NG_P2: tl.constexpr, GS: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = GS // 2
    gi = tl.arange(0, NG_P2)[:, None]
    pi = tl.arange(0, HALF)[None, :]
    mask = (gi < NG) & (pi < HALF)
    base = x_ptr + t * sx_t + h * sx_h + gi * GS + 2 * pi
    xe = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(base + 1, mask=mask, other=0.0).to(tl.float32)
    inf = float("inf")
    lo = tl.minimum(tl.min(tl.where(mask, xe, inf), axis=1), tl.min(tl.where(mask, xo, inf), axis=1))
    hi = tl.maximum(tl.max(tl.where(mask, xe, -inf), axis=1), tl.max(tl.where(mask, xo, -inf), axis=1))
    g1 = tl.arange(0, NG_P2)
    lo = tl.where(g1 < NG, lo, 0.0)
    hi = tl.where(g1 < NG, hi, 0.0)
    lo_b = _bf16_directed(lo, False)
    s_b = _bf16_directed(tl.math.div_rn(hi - lo_b, tl.zeros_like(hi) + 15.0), True)
    safe = tl.where(s_b > 0, s_b, 1.0)[:, None]
    qe = tl.minimum(_rne(tl.maximum(tl.math.div_rn(xe - lo_b[:, None], safe + tl.zeros_like(xe)), 0.0)), 15)
    qo = tl.minimum(_rne(tl.maximum(tl.math.div_rn(xo - lo_b[:, None], safe + tl.zeros_like(xo)), 0.0)), 15)
    byte = (qe | (qo << 4)).to(tl.uint8)
    slot = tl.load(loc_ptr + t)
    tl.store(data_ptr + slot * sd_t + h * sd_h + gi * HALF + pi, byte, mask=mask)
    sp = scale_ptr + slot * ss_t + h * ss_h + g1 * 2
    tl.store(sp, s_b.to(tl.bfloat16), mask=g1 < NG)
    tl.store(sp + 1, lo_b.to(tl.bfloat16), mask=g1 < NG)

@triton.jit
def _quant_bfp8_kernel(
    x_ptr, loc_ptr, data_ptr, scale_ptr,
    sx_t, sx_h, sd_t, sd_h, ss_t, ss_h,
    NB: tl.constexpr, NB_P2: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    bi = tl.arange(0, NB_P2)[:, None]
    ei = tl.arange(0, 16)[None, :]
    mask = (bi < NB) & (ei < 16)
    x = tl.load(x_ptr + t * sx_t + h * sx_h + bi * 16 + ei, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    exp = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF  # = floor(log2 amax) + 127; 0 if tiny/zero
    shift = (133 - exp)[:, None]
    half = shift >> 1
    mag = tl.minimum(_rne(tl.abs(x) * _pow2(half) * _pow2(shift - half)), 127)
    neg = (x < 0) & (mag > 0)
    byte = (mag | (neg.to(tl.int32) << 7)).to(tl.uint8)
    slot = tl.load(loc_ptr + t)
    tl.store(data_ptr + slot * sd_t + h * sd_h + bi * 16 + ei, byte, mask=mask)
    b1 = tl.arange(0, NB_P2)
    tl.store(scale_ptr + slot * ss_t + h * ss_h + b1, exp.to(tl.uint8), mask=b1 < NB)

@triton.jit
def _dequant_kernel(
    data_ptr, scale_ptr, page_ptr, out_ptr,
    sd_t, sd_h, ss_t, ss_h, so_t, so_h,
    PAGE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, MODE: tl.constexpr, GS: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    page = tl.load(page_ptr + r // PAGE).to(tl.int64)
    slot = page * PAGE + r % PAGE
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    drow = data_ptr + slot * sd_t + h * sd_h
    srow = scale_ptr + slot * ss_t + h * ss_h
    if MODE == 3:
        byte = tl.load(drow + offs // 2, mask=mask, other=0).to(tl.int32)
        q = tl.where((offs & 1) == 0, byte & 0xF, byte >> 4).to(tl.float32)
        g = offs // GS
        s = tl.load(srow + 2 * g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(srow + 2 * g + 1, mask=mask, other=0.0).to(tl.float32)
        val = q * s + z
    elif MODE == 4:
        byte = tl.load(drow + offs, mask=mask, other=0).to(tl.int32)
        e = tl.load(srow + offs // 16, mask=mask, other=0).to(tl.int32) - 133
        half = e >> 1
        mag = (byte & 0x7F).to(tl.float32) * _pow2(half) * _pow2(e - half)
        val = tl.where(byte >= 128, -mag, mag)
    else:
        byte = tl.load(drow + offs, mask=mask, other=0).to(tl.int32)
        if MODE == 2:
            s = tl.load(srow)
            val = tl.where(byte >= 128, byte - 256, byte).to(tl.float32) * s
        else:
            s = tl.load(srow).to(tl.float32)  # bf16 scale, exact in fp32
            if MODE == 1:
                val = _e4m3_decode(byte, 8) * s
            else:
                val = _e4m3_decode(byte, 7) * s
    tl.store(out_ptr + r * so_t + h * so_h + offs, val.to(out_ptr.dtype.element_ty), mask=mask)
