"""The golden edge cases pin down every choice docs/kv_format.md makes: for each one, the rule the
doc states and the alternative an implementer might pick give different bytes on some element of
the case (test_spec_reference.py checks that the doc's rule gives the stored bytes)."""

from __future__ import annotations

import numpy as np
import pytest

from sglang_memha.kvformat import KVFormat
from sglang_memha.kvformat.golden import GOLDEN_FORMATS, load

from .test_spec_reference import (F32, bf16_directed, bf16_value, bits, e4m3_table, enc_fp8_tensor, fp8_rne, int4_rule,
                                  le_hex, read_input)


def case(fmt: KVFormat, name: str) -> tuple[dict, np.ndarray, str]:
    c = {c["name"]: c for c in load(fmt)["cases"]}[name]
    x, dt = read_input(c)
    return c, x, dt


def tie_parities(v: np.ndarray, grid: np.ndarray) -> set[int]:
    """For the |v| that sit exactly halfway between two neighbours of ``grid`` (sorted, float64):
    the parities of the lower neighbour's index (the code, or the integer, below the tie)."""
    a = np.abs(v.astype(np.float64)).reshape(-1)
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    tie = a == (grid[lo] + grid[hi]) / 2
    return {int(p) for p in lo[tie] % 2}


def fp8_scale(x: np.ndarray, fnuz: bool) -> np.ndarray:
    c, s_min = (F32(224), 2.0**-125) if fnuz else (F32(448), 2.0**-126)
    return np.maximum(bf16_value(bf16_directed(np.abs(x).max(-1, keepdims=True) / c, up=True)), F32(s_min))


@pytest.mark.parametrize("fmt", [KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ], ids=str)
def test_fp8_multiplies_by_the_reciprocal(fmt):
    c, x, _ = case(fmt, "fp8_reciprocal_not_quotient")
    fnuz = fmt == KVFormat.FP8_E4M3FNUZ
    s = fp8_scale(x, fnuz)
    by_r, by_s = fp8_rne(x * (F32(1) / s), fnuz), fp8_rne(x / s, fnuz)
    assert (by_r != by_s).sum() >= 20
    assert le_hex(np.where(by_r == 0x80, 0, by_r), "u1") == c["data_hex"]


@pytest.mark.parametrize("fmt", [KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ, KVFormat.FP8_E4M3_TENSOR], ids=str)
def test_fp8_ties_go_to_even_both_ways(fmt):
    """x * r exactly halfway with the even code below (ties-away would differ) and above
    (ties-toward-zero would differ)."""
    c, x, _ = case(fmt, "fp8_ties_unit_scale")
    fnuz = fmt == KVFormat.FP8_E4M3FNUZ
    v = x if fmt == KVFormat.FP8_E4M3_TENSOR else x * (F32(1) / fp8_scale(x, fnuz))
    assert tie_parities(v, e4m3_table(fnuz)) == {0, 1}
    assert c["scales_hex"] == ("0040" if fnuz else "803f" if fmt == KVFormat.FP8_E4M3 else "0000803f")


def test_int8_ties_go_to_even_both_ways():
    _, x, _ = case(KVFormat.INT8, "int8_ties")
    scale = np.abs(x).max(-1, keepdims=True) / F32(127)
    assert sorted(scale.reshape(-1).tolist()) == [1.0, 3.0]
    assert tie_parities(x / scale, np.arange(0.0, 128.0)) == {0, 1}


@pytest.mark.parametrize("fmt,name", [(KVFormat.INT4_G32, "int4_ties"), (KVFormat.INT4_G64, "int4_ties"),
                                      (KVFormat.INT4_KIVI, "int4_ties_per_channel")], ids=str)
def test_int4_ties_go_to_even_both_ways(fmt, name):
    _, x, _ = case(fmt, name)
    t, h, d = x.shape
    if fmt == KVFormat.INT4_KIVI:
        g = x.reshape(t // 32, 32, h, d)
        sb, mb = int4_rule(g.min(1), g.max(1))
        u = (g - bf16_value(mb)[:, None]) / bf16_value(sb)[:, None]
    else:
        size = 32 if fmt == KVFormat.INT4_G32 else 64
        g = x.reshape(t, h, d // size, size)
        sb, mb = int4_rule(g.min(-1), g.max(-1))
        u = (g - bf16_value(mb)[..., None]) / bf16_value(sb)[..., None]
    assert tie_parities(u, np.arange(0.0, 16.0)) == {0, 1}


@pytest.mark.parametrize("name", ["saturation_above_448", "saturation_bf16_layer_scale_0.25",
                                  "saturation_fp16_layer_scale_0.001", "tensor_fp32_division_0.3"])
def test_fp8_tensor_saturates_beyond_rne_reach(name):
    """Quotients >= 464 (beyond what RNE alone takes to 448; fp16's overflow to inf included) are
    written as +-448 (0x7e / 0xfe)."""
    c, x, _ = case(KVFormat.FP8_E4M3_TENSOR, name)
    ls = F32(c["layer_scale"] or 1.0)
    with np.errstate(over="ignore"):
        far = np.abs(x / ls) >= 464
    codes = np.frombuffer(bytes.fromhex(c["data_hex"]), np.uint8).reshape(x.shape)
    assert far.sum() >= 3 and set(codes[far].tolist()) == {0x7E, 0xFE}


def test_fp8_tensor_rounds_the_quotient_to_the_input_dtype():
    c, x, dt = case(KVFormat.FP8_E4M3_TENSOR, "tensor_bf16_quotient_rounded_0.3")
    assert dt == "bfloat16"
    once = fp8_rne(np.clip(x / F32(c["layer_scale"]), F32(-448), F32(448)), fnuz=False)
    assert enc_fp8_tensor(x, dt, c)[0] == c["data_hex"] != le_hex(once, "u1")


def test_fp8_tensor_divides_by_the_layer_scale():
    c, x, dt = case(KVFormat.FP8_E4M3_TENSOR, "tensor_fp32_division_0.3")
    ls = F32(c["layer_scale"])
    recip = fp8_rne(np.clip(x * (F32(1) / ls), F32(-448), F32(448)), fnuz=False)
    assert enc_fp8_tensor(x, dt, c)[0] == c["data_hex"] != le_hex(recip, "u1")


def _bfp8_blocks(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c, x, _ = case(KVFormat.BFP8, name)
    t, h, d = x.shape
    exp = np.frombuffer(bytes.fromhex(c["scales_hex"]), np.uint8).reshape(t, h, d // 16)
    data = np.frombuffer(bytes.fromhex(c["data_hex"]), np.uint8).reshape(t, h, d // 16, 16)
    return x.reshape(t, h, d // 16, 16), exp, data


def test_bfp8_exponent_is_the_exponent_field_not_a_float_log2():
    blk, exp, data = _bfp8_blocks("bfp8_below_powers_of_two")
    amax = np.abs(blk).max(-1)
    assert (exp == (bits(amax) >> 23) & 0xFF).all()
    via_log2 = np.floor(np.log2(amax)).astype(np.int64) + 127  # fp32 log2 rounds 2^k (1 - 2^-24) up to k
    assert (via_log2 != exp).sum() >= 2
    # amax * 2^(133 - exp) rounds to 128 (just below a power of two, or 127.5 / 128): saturates at 127
    top = np.rint(np.ldexp(amax.astype(np.float64), 133 - exp.astype(np.int64)))
    assert (top == 128).sum() >= 4
    assert ((data & 0x7F).max(-1)[top == 128] == 127).all()


def test_bfp8_tiny_exponents_need_exact_scaling():
    blk, exp, data = _bfp8_blocks("bfp8_tiny_exponents")
    assert set(exp.reshape(-1).tolist()) == {0, 1}
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(2.0) ** (133 - exp.astype(np.float32))).all()  # 2^(133 - exp) is not an fp32
    assert not data[0, 0, 3].any()  # +-2^-149 alone: exponent 0, every magnitude 0, no sign


def test_zero_blocks():
    _, exp, _ = _bfp8_blocks("zero_blocks")
    assert exp.reshape(-1).tolist()[:3] == [0, 0, 0] and exp[1].reshape(-1).tolist() == [0] * 4
    c = case(KVFormat.INT8, "zero_blocks")[0]
    assert c["scales_hex"][8:] == "00000000"  # an all -0 row: scale +0
    for fmt in (KVFormat.INT4_G32, KVFormat.INT4_G64):
        c = case(fmt, "zero_blocks")[0]
        assert set(c["scales_hex"][len(c["scales_hex"]) // 2:]) == {"0"}  # row 1: (+0, +0) pairs


NEG_ZERO_WRITERS = {KVFormat.BF16, KVFormat.FP8_E4M3_TENSOR}


@pytest.mark.parametrize("fmt", GOLDEN_FORMATS, ids=str)
def test_which_encoders_write_negative_zero(fmt):
    """docs/kv_format.md, Conventions: only bf16 (0x8000) and fp8_e4m3_tensor (0x80) write a
    negative zero, from -0 inputs and negatives that round to zero; every other encoder writes +0
    (codes, scales, and the values it decodes to)."""
    doc = load(fmt)
    neg_data, neg_other = 0, 0
    for c in doc["cases"]:
        data = bytes.fromhex(c["data_hex"])
        if fmt == KVFormat.BF16:
            neg_data += np.frombuffer(data, "<u2").tolist().count(0x8000)
        elif fmt in (KVFormat.FP8_E4M3, KVFormat.FP8_E4M3_TENSOR, KVFormat.FP8_E4M3FNUZ, KVFormat.INT8, KVFormat.BFP8):
            neg_data += data.count(0x80)  # fn / tensor: -0; fnuz: NaN; int8: -128; bfp8: sign of mag 0
        scales = bytes.fromhex(c["scales_hex"])
        if fmt in (KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ) or fmt.value.startswith("int4"):
            neg_other += np.frombuffer(scales, "<u2").tolist().count(0x8000)
        elif fmt == KVFormat.INT8:
            neg_other += np.frombuffer(scales, "<u4").tolist().count(0x80000000)
        y = np.frombuffer(bytes.fromhex(c["dequant_fp32_hex"]), "<f4")
        neg_other += int(((y == 0) & np.signbit(y)).sum()) if fmt not in NEG_ZERO_WRITERS else 0
    assert neg_other == 0
    assert (neg_data > 0) == (fmt in NEG_ZERO_WRITERS)


def test_doc_lists_every_edge_case():
    """The "Golden vectors" table of docs/kv_format.md names exactly the edge cases the generator makes."""
    from sglang_memha.kvformat.golden import edge_inputs

    from .doc_tables import DOC

    text = DOC.read_text()
    table = text[text.index("| case | pins down |"):]
    table = table[:table.index("\n\n")] if "\n\n" in table else table
    named = set()
    for line in table.splitlines()[2:]:
        named |= {n.strip().strip("`") for n in line.split("|")[1].replace("(kivi)", "").split(",")}
    assert named == {n for n, _, _ in edge_inputs()} | {"int4_ties_per_channel"}
