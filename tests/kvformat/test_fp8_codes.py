"""fp8 decode tables against torch's float8 dtypes, and the fn <-> fnuz bridge on all 256 codes."""

from __future__ import annotations

import math

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.fp8 import decode_lut, e4m3_value, fn_to_fnuz, fnuz_to_fn

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
    return decode_lut(fnuz)[data.long()] * scales.float()


def _bf16(v: float, n: int) -> torch.Tensor:
    s = torch.full((n, 1, 1), v, dtype=torch.bfloat16)
    assert float(s[0]) == v
    return s


# bf16 scales: the fn floor 2^-126, a subnormal, an odd mantissa, 1, a large one, the largest doubled
FN_SCALES = [2.0**-126, 2.0**-130, 0.2236328125, 1.0, 30064771072.0, 1.5 * 2.0**126]
FNUZ_SCALES = [2.0**-125, 2.0**-126, 0.447265625, 1.0, 30064771072.0, 1.5 * 2.0**127]


@pytest.mark.parametrize("s", FN_SCALES)
def test_fn_to_fnuz_exact_on_every_finite_code(s):
    finite = [c for c in range(256) if c not in (0x7F, 0xFF)]
    data = torch.tensor(finite, dtype=torch.uint8).reshape(-1, 1, 1)  # one code per row
    scales = _bf16(s, len(finite))
    nz, nz_scales = fn_to_fnuz(data, scales)
    assert nz_scales.dtype == torch.bfloat16 and torch.equal(nz_scales.float(), scales.float() * 2)
    assert torch.equal(_value(data, scales, False), _value(nz, nz_scales, True))  # value-exact (-0 == +0)
    assert int((nz == 0x80).sum()) == 0  # no fnuz NaN produced
    back, back_scales = fnuz_to_fn(nz, nz_scales)
    expect = torch.where(data == 0x80, 0, data).to(torch.uint8)  # -0 normalizes to +0
    assert torch.equal(back, expect) and torch.equal(back_scales, scales)


@pytest.mark.parametrize("s", FNUZ_SCALES)
def test_fnuz_to_fn_exact_on_every_non_nan_code(s):
    codes = [c for c in range(256) if c != 0x80]
    data = torch.tensor(codes, dtype=torch.uint8).reshape(-1, 1, 1)
    scales = _bf16(s, len(codes))
    fn, fn_scales = fnuz_to_fn(data, scales)
    assert torch.equal(_value(data, scales, True), _value(fn, fn_scales, False))
    assert int(((fn & 0x7F) == 0x7F).sum()) == 0  # never an fn NaN
    # rows without +-240 keep their bytes (scale / 2); +-240 rows are re-encoded at the same scale
    kept = (data & 0x7F) != 0x7F
    assert torch.equal(fn[kept], data[kept]) and bool((fn_scales[kept].float() == s / 2).all())
    assert bool((fn_scales[~kept].float() == s).all())


def test_bridges_take_and_return_raw_scale_bytes():
    """A pool's companion rows are uint8 [..., 2] (the bf16 bytes): same conversion, same form back."""
    x = torch.randn(16, 3, 64) * 10
    data, s = get_codec("fp8_e4m3fnuz").quantize(x)
    raw = s.view(torch.uint8)
    assert raw.shape == (16, 3, 2)
    fn, fn_raw = fnuz_to_fn(data, raw)
    fn2, fn_s = fnuz_to_fn(data, s)
    assert fn_raw.dtype == torch.uint8 and fn_raw.shape == (16, 3, 2)
    assert torch.equal(fn, fn2) and torch.equal(fn_raw.view(torch.bfloat16), fn_s)
    nz, nz_raw = fn_to_fnuz(fn, fn_raw)
    assert torch.equal(nz, data) and torch.equal(nz_raw, raw)


def test_fnuz_to_fn_mixed_row_rounds_only_the_odd_subnormals():
    # a foreign fnuz row holding 240 and 2^-10 cannot be exact in fn (dynamic range); documented
    data = torch.tensor([[[0x7F, 0x01, 0x02, 0x40]]], dtype=torch.uint8)
    fn, fn_scale = fnuz_to_fn(data, _bf16(1.0, 1))
    vals = decode_lut(False)[fn.long()][0, 0].tolist()
    assert float(fn_scale) == 1.0
    assert vals[0] == 240.0 and vals[2] == 2.0**-9 and vals[3] == 1.0
    assert abs(vals[1] - 2.0**-10) <= 2.0**-10  # RNE: 2^-10 -> 0 (tie to even)


def test_fnuz_to_fn_row_whose_half_scale_is_not_bf16_is_reencoded():
    # s = 2^-133 (bf16's smallest subnormal; our encoder writes s >= 2^-125): s / 2 is not a bf16,
    # so the scale is kept and the codes re-encoded, exact for every code but the 16 fnuz values
    # m * 2^-10 with m odd
    codes = [c for c in range(256) if c != 0x80]
    data = torch.tensor(codes, dtype=torch.uint8).reshape(-1, 1, 1)
    scales = _bf16(2.0**-133, len(codes))
    fn, fn_scales = fnuz_to_fn(data, scales)
    assert bool((fn_scales.float() == 2.0**-133).all())
    before, after = _value(data, scales, True), _value(fn, fn_scales, False)
    inexact = [c for c, same in zip(codes, (before == after).reshape(-1).tolist()) if not same]
    assert inexact == [c | s for s in (0, 0x80) for c in range(1, 16, 2)]  # 0x01..0x0F odd, both signs
    assert bool(((before - after).abs() <= 2.0**-10 * 2.0**-133).all())


def test_bridge_rejects_nan_codes_and_bad_scales():
    one = _bf16(1.0, 1).reshape(1)
    with pytest.raises(ValueError, match="e4m3fn NaN"):
        fn_to_fnuz(torch.tensor([0x7F], dtype=torch.uint8), one)
    with pytest.raises(ValueError, match="e4m3fnuz NaN"):
        fnuz_to_fn(torch.tensor([0x80], dtype=torch.uint8), one)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="non-finite bf16 scale"):
            fnuz_to_fn(torch.tensor([0x10], dtype=torch.uint8), torch.full((1,), bad, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"scale\(s\) >= 2\^127"):
        fn_to_fnuz(torch.tensor([0x10], dtype=torch.uint8), torch.full((1,), 2.0**127, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"scales=\(1,\) torch.float32: expected bf16 scales"):
        fn_to_fnuz(torch.tensor([0x10], dtype=torch.uint8), torch.ones(1))


def test_our_fnuz_pages_bridge_with_bytes_unchanged():
    x = torch.randn(32, 4, 128) * torch.logspace(-4, 2, 128)
    data, scales = get_codec("fp8_e4m3fnuz").quantize(x)
    assert int(((data & 0x7F) == 0x7F).sum()) == 0  # clamp at 224: 0x7F/0xFF never written
    fn, fn_scales = fnuz_to_fn(data, scales)
    assert torch.equal(fn, data)
    # and they are exactly what the fn encoder writes for the same input, scale halved
    fn_data, fn_s = get_codec("fp8_e4m3").quantize(x)
    assert torch.equal(fn_data, data) and torch.equal(fn_s, fn_scales)
    fn_codec = get_codec("fp8_e4m3")
    nz_codec = get_codec("fp8_e4m3fnuz")
    assert torch.equal(
        fn_codec.dequantize(fn, fn_scales, torch.float32), nz_codec.dequantize(data, scales, torch.float32)
    )


def test_lut_nan_positions():
    assert [c for c in range(256) if math.isnan(e4m3_value(c, False))] == [0x7F, 0xFF]
    assert [c for c in range(256) if math.isnan(e4m3_value(c, True))] == [0x80]
