"""An encoder written from docs/kv_format.md alone (numpy and Python integers, no torch, no
sglang_memha codec) reproduces every golden file's bytes: the doc's rules are complete and exact.

Each function below follows one section of the doc; where the doc says "fp32(a op b)" the code
uses numpy float32 arithmetic (IEEE, correctly rounded), where it says RNE it rounds half to even.
"""

from __future__ import annotations

import numpy as np
import pytest

from sglang_memha.kvformat import KVFormat
from sglang_memha.kvformat.golden import GOLDEN_FORMATS, load

F32 = np.float32


# ---------------------------------------------------------------- helpers (Conventions)

def read_input(case: dict) -> tuple[np.ndarray, str]:
    """input_hex -> fp32 values [T, H, D] (bf16 / fp16 widened exactly) and the input dtype."""
    raw, dt = bytes.fromhex(case["input_hex"]), case["input_dtype"]
    if dt == "float32":
        x = np.frombuffer(raw, "<f4")
    elif dt == "float16":
        x = np.frombuffer(raw, "<f2").astype(F32)
    else:  # bfloat16: the high half of an fp32
        x = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(F32)
    return x.reshape(case["shape"]).astype(F32), dt


def bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, F32).view(np.uint32).astype(np.int64)


def bf16_rne(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round to nearest even (finite inputs)."""
    b = bits(x)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF


def bf16_directed(x: np.ndarray, up: bool) -> np.ndarray:
    """fp32 -> bf16 bits rounded toward +inf (up) or -inf: truncate, and add one unit to the
    magnitude when a low bit is set and the direction points away from zero."""
    b = bits(x)
    neg = b >> 31 == 1
    bump = ((b & 0xFFFF) != 0) & (~neg if up else neg)
    return ((b >> 16) + bump) & 0xFFFF


def bf16_value(h: np.ndarray) -> np.ndarray:
    return (np.asarray(h, np.int64).astype(np.uint32) << 16).view(F32)


def le_hex(a: np.ndarray, dtype: str) -> str:
    return np.ascontiguousarray(a).astype(dtype).tobytes().hex()


def e4m3_table(fnuz: bool) -> np.ndarray:
    """Value of each positive code (0x00 .. max code) from the doc's encoding table."""
    bias, top = (8, 0x7F) if fnuz else (7, 0x7E)
    out = []
    for c in range(top + 1):
        e, m = c >> 3, c & 7
        out.append(m / 8 * 2.0 ** (1 - bias) if e == 0 else (1 + m / 8) * 2.0 ** (e - bias))
    return np.array(out)


def fp8_rne(v: np.ndarray, fnuz: bool) -> np.ndarray:
    """fp32 values -> codes: nearest e4m3 value, ties to the even code (= even mantissa); the sign
    bit is the sign of v (-0 and negatives that round to zero give 0x80; fnuz has no -0). Values
    may exceed the maximum by less than half its step (RNE maps them to it), no further."""
    table = e4m3_table(fnuz)
    a = np.abs(v.astype(np.float64))
    assert (a < table[-1] + (table[-1] - table[-2]) / 2).all(), "fp8_rne: value beyond RNE's reach of the maximum"
    hi = np.clip(np.searchsorted(table, a), 1, len(table) - 1)
    lo = hi - 1
    mid = (table[lo] + table[hi]) / 2  # exact in float64
    code = np.where(a < mid, lo, np.where(a > mid, hi, np.where(lo % 2 == 0, lo, hi)))
    neg = np.signbit(v)
    if fnuz:
        return np.where(neg & (code > 0), code | 0x80, code)
    return np.where(neg, code | 0x80, code)


def rne_int(v: np.ndarray) -> np.ndarray:
    return np.rint(v.astype(np.float64))  # fp32 values are exact in float64; rint ties to even


# ---------------------------------------------------------------- formats

def enc_bf16(x, dt, case):
    return le_hex(bf16_rne(x), "<u2"), "", bf16_value(bf16_rne(x))


def enc_fp8(x, dt, case, fnuz: bool):
    c, s_min = (F32(224), 2.0**-125) if fnuz else (F32(448), 2.0**-126)
    amax = np.abs(x).max(-1, keepdims=True)
    s_bits = bf16_directed(amax / c, up=True)
    s = np.maximum(bf16_value(s_bits), F32(s_min))
    r = F32(1) / s
    code = fp8_rne(x * r, fnuz)
    if not fnuz:
        code = np.where(code == 0x80, 0, code)  # the per-row encoders write zero as 0x00
    vals = np.where(code >= 0x80, -1, 1) * e4m3_table(fnuz)[code & 0x7F]
    return le_hex(code, "u1"), le_hex(bf16_rne(s), "<u2"), (vals * s).astype(F32)


def enc_fp8_tensor(x, dt, case):
    ls = F32(1.0 if case["layer_scale"] is None else case["layer_scale"])
    q = x / ls  # fp32 division, correctly rounded ...
    if dt == "bfloat16":  # ... then rounded (RNE) to the input's dtype
        q = bf16_value(bf16_rne(q))
    elif dt == "float16":
        with np.errstate(over="ignore"):
            q = q.astype(np.float16).astype(F32)  # may overflow to inf; the clamp saturates it
    code = fp8_rne(np.clip(q, F32(-448), F32(448)), fnuz=False)
    vals = np.where(code >= 0x80, -1.0, 1.0) * e4m3_table(False)[code & 0x7F]
    return le_hex(code, "u1"), le_hex(np.array([ls]), "<f4"), (vals * ls).astype(F32)


def enc_int8(x, dt, case):
    scale = np.abs(x).max(-1, keepdims=True) / F32(127)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(scale > 0, np.clip(rne_int(x / scale), -127, 127), 0).astype(np.int64)
    return le_hex(q & 0xFF, "u1"), le_hex(scale, "<f4"), (q.astype(F32) * scale).astype(F32)


def int4_rule(lo32, hi32):
    """A group's fp32 min and max -> (scale_b, min_b) bf16 bits; zeros are +0."""
    min_bits = bf16_directed(np.where(lo32 == 0, F32(0), lo32), up=False)
    diff = (hi32 - bf16_value(min_bits)) / F32(15)
    scale_bits = bf16_directed(np.where(diff == 0, F32(0), diff), up=True)
    return scale_bits, min_bits


def int4_q(x, scale_bits, min_bits):
    s, m = bf16_value(scale_bits), bf16_value(min_bits)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.where(s > 0, np.clip(rne_int((x - m) / s), 0, 15), 0).astype(np.int64)
    return q, (q.astype(F32) * s + m).astype(F32)


def pack(q):
    return q[..., 0::2] | (q[..., 1::2] << 4)


def enc_int4(x, dt, case, g: int):
    t, h, d = x.shape
    grp = x.reshape(t, h, d // g, g)
    sb, mb = int4_rule(grp.min(-1), grp.max(-1))
    q, xh = int4_q(grp, sb[..., None], mb[..., None])
    return le_hex(pack(q.reshape(t, h, d)), "u1"), le_hex(np.stack([sb, mb], -1), "<u2"), xh.reshape(t, h, d)


def enc_kivi(x, dt, case):
    t, h, d = x.shape
    blk = x.reshape(t // 32, 32, h, d)
    sb, mb = int4_rule(blk.min(1), blk.max(1))  # [NB, H, D]
    q, xh = int4_q(blk, sb[:, None], mb[:, None])
    table = np.stack([sb, mb], -1).reshape(t // 32, h, 32, d // 32, 2)  # row r: channels r*D/32 ..
    rows = table.transpose(0, 2, 1, 3, 4).reshape(t, h, d // 32, 2)
    return le_hex(pack(q.reshape(t, h, d)), "u1"), le_hex(rows, "<u2"), xh.reshape(t, h, d)


def enc_bfp8(x, dt, case):
    t, h, d = x.shape
    blk = x.reshape(t, h, d // 16, 16)
    exp = (bits(np.abs(blk).max(-1)) >> 23) & 0xFF  # the biased exponent field of fp32(amax)
    shift = (133 - exp)[..., None]
    mag = np.minimum(rne_int(np.ldexp(np.abs(blk).astype(np.float64), shift)), 127).astype(np.int64)
    sign = (blk < 0) & (mag > 0)
    data = np.where(sign, 0x80, 0) | mag
    xh = np.where(sign, -1.0, 1.0) * np.ldexp(mag.astype(np.float64), shift.astype(np.int64) * -1)
    return le_hex(data.reshape(t, h, d), "u1"), le_hex(exp, "u1"), xh.reshape(t, h, d).astype(F32)


ENCODERS = {
    KVFormat.BF16: enc_bf16,
    KVFormat.FP8_E4M3: lambda x, dt, c: enc_fp8(x, dt, c, fnuz=False),
    KVFormat.FP8_E4M3FNUZ: lambda x, dt, c: enc_fp8(x, dt, c, fnuz=True),
    KVFormat.FP8_E4M3_TENSOR: enc_fp8_tensor,
    KVFormat.INT8: enc_int8,
    KVFormat.INT4_G32: lambda x, dt, c: enc_int4(x, dt, c, 32),
    KVFormat.INT4_G64: lambda x, dt, c: enc_int4(x, dt, c, 64),
    KVFormat.BFP8: enc_bfp8,
    KVFormat.INT4_KIVI: enc_kivi,
}


def test_every_format_has_a_reference_encoder():
    """Every format with its own rows (int4_kivi_g64's K and V are int4_kivi's and int4_g64's)."""
    assert set(ENCODERS) == set(GOLDEN_FORMATS)


@pytest.mark.parametrize("fmt", GOLDEN_FORMATS, ids=str)
def test_doc_rules_reproduce_the_golden_bytes(fmt):
    doc = load(fmt)
    for case in doc["cases"]:
        x, dt = read_input(case)
        data_hex, scales_hex, x_hat = ENCODERS[fmt](x, dt, case)
        name = f"{fmt.value} case {case['name']}"
        assert data_hex == case["data_hex"], f"{name}: data bytes differ from the doc's rule"
        assert scales_hex == case["scales_hex"], f"{name}: scale bytes differ from the doc's rule"
        assert le_hex(x_hat, "<f4") == case["dequant_fp32_hex"], f"{name}: decoded values differ"
