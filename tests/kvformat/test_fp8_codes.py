"""fp8 decode tables against torch's float8 dtypes, and the fn <-> fnuz bridge on all 256 codes."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.fp8 import decode_lut, e4m3_value, e8m0_to_f32, fn_to_fnuz, fnuz_to_fn

CODES = torch.arange(256, dtype=torch.uint8)


@pytest.mark.parametrize("fnuz, dtype", [(False, torch.float8_e4m3fn), (True, torch.float8_e4m3fnuz)])
def test_decode_formula_matches_torch_on_all_codes(fnuz, dtype):
    ours = decode_lut(fnuz)
    theirs = CODES.view(dtype).float()
    same = (ours == theirs) | (ours.isnan() & theirs.isnan())
    assert bool(same.all()), CODES[~same].tolist()
    assert torch.equal(torch.signbit(ours[~ours.isnan()]), torch.signbit(theirs[~theirs.isnan()]))
    assert float(ours.nan_to_num(0).abs().max()) == (240.0 if fnuz else 448.0)


def test_fnuz_is_half_of_fn_outside_specials():
    for c in range(256):
        if c in (0x7F, 0xFF, 0x80):
            continue
        assert e4m3_value(c, True) == e4m3_value(c, False) / 2


def _value(data, scales, fnuz):
    return decode_lut(fnuz)[data.long()] * e8m0_to_f32(scales)


@pytest.mark.parametrize("e", [0, 1, 120, 127, 150, 253])
def test_fn_to_fnuz_exact_on_every_finite_code(e):
    finite = [c for c in range(256) if c not in (0x7F, 0xFF)]
    data = torch.tensor(finite, dtype=torch.uint8).reshape(-1, 1, 1)  # one code per row
    scales = torch.full((len(finite), 1, 1), e, dtype=torch.uint8)
    nz, nz_scales = fn_to_fnuz(data, scales)
    assert torch.equal(nz_scales, scales + 1)
    assert torch.equal(_value(data, scales, False), _value(nz, nz_scales, True))  # value-exact (-0 == +0)
    assert int((nz == 0x80).sum()) == 0  # no fnuz NaN produced
    back, back_scales = fnuz_to_fn(nz, nz_scales)
    expect = torch.where(data == 0x80, 0, data).to(torch.uint8)  # -0 normalizes to +0
    assert torch.equal(back, expect) and torch.equal(back_scales, scales)


@pytest.mark.parametrize("e", [1, 120, 127, 150, 254])
def test_fnuz_to_fn_exact_on_every_non_nan_code(e):
    codes = [c for c in range(256) if c != 0x80]
    data = torch.tensor(codes, dtype=torch.uint8).reshape(-1, 1, 1)
    scales = torch.full((len(codes), 1, 1), e, dtype=torch.uint8)
    fn, fn_scales = fnuz_to_fn(data, scales)
    assert torch.equal(_value(data, scales, True), _value(fn, fn_scales, False))
    assert int(((fn & 0x7F) == 0x7F).sum()) == 0  # never an fn NaN
    # rows without +-240 keep their bytes (exponent - 1); +-240 rows are re-encoded at the same scale
    kept = (data & 0x7F) != 0x7F
    assert torch.equal(fn[kept], data[kept]) and bool((fn_scales[kept] == e - 1).all())
    assert bool((fn_scales[~kept] == e).all())


def test_fnuz_to_fn_mixed_row_rounds_only_the_odd_subnormals():
    # a foreign fnuz row holding 240 and 2^-10 cannot be exact in fn (dynamic range); documented
    data = torch.tensor([[[0x7F, 0x01, 0x02, 0x40]]], dtype=torch.uint8)
    fn, fn_scale = fnuz_to_fn(data, torch.full((1, 1, 1), 127, dtype=torch.uint8))
    vals = decode_lut(False)[fn.long()][0, 0].tolist()
    assert vals[0] == 240.0 and vals[2] == 2.0**-9 and vals[3] == 1.0
    assert abs(vals[1] - 2.0**-10) <= 2.0**-10  # RNE: 2^-10 -> 0 (tie to even)


def test_fnuz_to_fn_row_at_the_smallest_scale_is_reencoded():
    # fnuz e = 0 (2^-127; our encoder writes e >= 1) would need fn e = -1: the exponent is kept and
    # the codes re-encoded, exact for every code but the 16 fnuz values m * 2^-10 with m odd
    codes = [c for c in range(256) if c != 0x80]
    data = torch.tensor(codes, dtype=torch.uint8).reshape(-1, 1, 1)
    scales = torch.zeros(len(codes), 1, 1, dtype=torch.uint8)
    fn, fn_scales = fnuz_to_fn(data, scales)
    assert bool((fn_scales == 0).all())
    before, after = _value(data, scales, True), _value(fn, fn_scales, False)
    inexact = [c for c, same in zip(codes, (before == after).reshape(-1).tolist()) if not same]
    assert inexact == [c | s for s in (0, 0x80) for c in range(1, 16, 2)]  # 0x01..0x0F odd, both signs
    assert bool(((before - after).abs() <= 2.0**-10 * 2.0**-127).all())


def test_bridge_rejects_nan_codes_and_bad_exponents():
    one = torch.full((1,), 127, dtype=torch.uint8)
    with pytest.raises(ValueError, match="e4m3fn NaN"):
        fn_to_fnuz(torch.tensor([0x7F], dtype=torch.uint8), one)
    with pytest.raises(ValueError, match="e4m3fnuz NaN"):
        fnuz_to_fn(torch.tensor([0x80], dtype=torch.uint8), one)
    with pytest.raises(ValueError, match="E8M0 NaN"):
        fnuz_to_fn(torch.tensor([0x10], dtype=torch.uint8), torch.full((1,), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="exponent byte"):
        fn_to_fnuz(torch.tensor([0x10], dtype=torch.uint8), torch.full((1,), 254, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"scales.dtype=torch.float32: expected uint8 E8M0"):
        fn_to_fnuz(torch.tensor([0x10], dtype=torch.uint8), torch.ones(1))


def test_our_fnuz_pages_bridge_with_bytes_unchanged():
    x = torch.randn(32, 4, 128) * torch.logspace(-4, 2, 128)
    data, scales = get_codec("fp8_e4m3fnuz").quantize(x)
    assert int(((data & 0x7F) == 0x7F).sum()) == 0  # clamp at 224: 0x7F/0xFF never written
    fn, fn_scales = fnuz_to_fn(data, scales)
    assert torch.equal(fn, data)
    # and they are exactly what the fn encoder writes for the same input, exponent byte - 1
    fn_data, fn_e = get_codec("fp8_e4m3").quantize(x)
    assert torch.equal(fn_data, data) and torch.equal(fn_e, fn_scales)
    fn_codec = get_codec("fp8_e4m3")
    nz_codec = get_codec("fp8_e4m3fnuz")
    assert torch.equal(
        fn_codec.dequantize(fn, fn_scales, torch.float32), nz_codec.dequantize(data, scales, torch.float32)
    )


def test_lut_nan_positions():
    assert [c for c in range(256) if math.isnan(e4m3_value(c, False))] == [0x7F, 0xFF]
    assert [c for c in range(256) if math.isnan(e4m3_value(c, True))] == [0x80]
