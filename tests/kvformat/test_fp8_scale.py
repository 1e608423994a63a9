"""The fp8 bf16 scale rule (FORMAT_VERSION 3): s = max(bf16_up(fp32(amax / C)), S_MIN), codes =
RNE(fp32(x * fp32(1 / s))), checked against exact rational arithmetic at the bf16 boundaries and
through both quantize paths (fused C kernel and torch reference)."""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.fp8 import S_MIN_FN, S_MIN_FNUZ, decode_lut, fp8_row_scale, layer_to_token_scale

# (format, C, S_MIN)
RULES = [("fp8_e4m3", 448.0, S_MIN_FN), ("fp8_e4m3fnuz", 224.0, S_MIN_FNUZ)]


def f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b))[0]


def rn_f32(q: Fraction) -> float:
    """q >= 0 rounded to the nearest fp32, ties to even, in exact arithmetic."""
    c = f32(float(q))  # within an ulp or so; pick the nearest of c and its neighbours exactly
    b = f32_bits(c)
    cands = [bits_f32(x) for x in (b - 1, b, b + 1) if 0 <= x < 0x7F800000]
    best = min(cands, key=lambda v: (abs(Fraction(v) - q), f32_bits(v) & 1))
    return best


def exact_scale(amax: float, c: float, s_min: float) -> float:
    """The rule in exact arithmetic: q = RN_fp32(amax / c), the smallest bf16 >= q, at least s_min."""
    q = rn_f32(Fraction(amax) / Fraction(c))
    b = f32_bits(q)
    up = bits_f32((b + 0xFFFF) & 0xFFFF0000)
    assert Fraction(up) >= Fraction(q) and (b & 0xFFFF == 0 or up > q)
    return max(up, s_min)


def next_up(v: float) -> float:
    return torch.nextafter(torch.tensor(v), torch.tensor(math.inf)).item()


def next_down(v: float) -> float:
    return torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item()


def boundary_amaxes(c: float) -> list[float]:
    """amax = C * b for bf16 b (where amax / C is exactly a bf16), one fp32 ulp either side,
    over the whole range, plus zero, subnormals and 2^64."""
    vals = [0.0, 2.0**-149, 2.0**-140, next_down(2.0**-126), 2.0**-126, 1.0, 2.0**64, next_down(2.0**64)]
    g = torch.Generator().manual_seed(11)
    mant = torch.randint(0, 128, (210,), generator=g).tolist()
    for k, m in zip(range(-150, 60), mant):
        b = f32(c * (1 + m / 128) * 2.0**k)
        if 0 < b <= 2.0**64:
            vals += [b, next_up(b), next_down(b)]
    return [v for v in vals if v <= 2.0**64]


@pytest.mark.parametrize("fmt, c, s_min", RULES)
def test_scale_is_exact_at_bf16_boundaries(fmt, c, s_min):
    amax = boundary_amaxes(c)
    got = fp8_row_scale(torch.tensor(amax, dtype=torch.float32), c, s_min).float().tolist()
    want = [exact_scale(a, c, s_min) for a in amax]
    bad = [(a, g, w) for a, g, w in zip(amax, got, want) if g != w]
    assert not bad, bad[:5]


@pytest.mark.parametrize("fmt, c, s_min", RULES)
def test_scale_is_exact_on_random_bit_patterns(fmt, c, s_min):
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(0, 0x5F800001, (4000,), generator=g, dtype=torch.int64).to(torch.int32)  # [0, 2^64]
    amax = bits.view(torch.float32)
    got = fp8_row_scale(amax, c, s_min).float().tolist()
    assert got == [exact_scale(a, c, s_min) for a in amax.tolist()]


def test_named_cases():
    s = lambda a, c=448.0, m=S_MIN_FN: float(fp8_row_scale(torch.tensor([a]), c, m))  # noqa: E731
    assert s(448.0) == 1.0 and s(next_down(448.0)) == 1.0 and s(next_up(448.0)) == 1 + 2.0**-7
    assert s(100.0) == 0.2236328125  # worked example: 100 / 448 = 0.22321... -> bf16 up 0x3e65
    assert s(0.0) == 2.0**-126 and s(2.0**-149) == 2.0**-126 and s(448.0 * 2.0**-126) == 2.0**-126
    assert s(next_up(448.0 * 2.0**-126)) == 2.0**-126 * (1 + 2.0**-7)
    assert s(0.0, 224.0, S_MIN_FNUZ) == 2.0**-125 and s(100.0, 224.0, S_MIN_FNUZ) == 2 * 0.2236328125


@pytest.mark.parametrize("fmt, c, s_min", RULES)
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_quantize_writes_the_rule(fmt, c, s_min, path):
    codec = get_codec(fmt)
    amax = boundary_amaxes(c)
    x = torch.zeros(len(amax), 1, 64)
    x[:, 0, 3] = torch.tensor(amax)
    x[:, 0, 5] = -torch.tensor(amax) / 3  # smaller elements of both signs
    x[::2, 0, 3] *= -1  # the amax element negative in every other row
    q = codec.quantize if path == "fused" else codec.quantize_reference
    data, s = q(x)
    assert s.dtype == torch.bfloat16 and s.shape == (len(amax), 1, 1)
    assert s.float().reshape(-1).tolist() == [exact_scale(a, c, s_min) for a in amax]
    # codes are RNE(x * fp32(1 / s)): compare with torch's own fp8 cast of that product
    r = torch.tensor([rn_f32(1 / Fraction(v)) for v in s.float().reshape(-1).tolist()])
    want = (x * r[:, None, None]).to(codec.torch_dtype).view(torch.uint8)
    want = torch.where(want == 0x80, 0, want) if fmt == "fp8_e4m3" else want
    assert torch.equal(data, want)
    # the amax element rounds to exactly C (error <= 2^-7 of it), unless s is the floor S_MIN
    y = codec.dequantize(data, s, torch.float32)
    top = decode_lut(fmt.endswith("fnuz"))[data[:, 0, 3].long()].abs()
    unclamped = s.reshape(-1).float() > s_min
    assert bool((top[unclamped] == c).all())
    err = (y[:, 0, 3] - x[:, 0, 3]).abs()
    assert bool((err[unclamped] <= x[unclamped, 0, 3].abs() * 2.0**-7).all())
    assert int(((data & 0x7F) == 0x7F).sum()) == 0  # never a NaN code (fn) / never +-240 (fnuz)


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_fnuz_writes_the_fn_codes_with_scale_doubled(path):
    """For every input (the S_MIN floor included): same code bytes, fnuz s = 2 * fn s."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 2, 64, generator=g) * torch.logspace(-45, 18, 600)[:, None, None]
    x[::7] = 0.0
    fn, nz = get_codec("fp8_e4m3"), get_codec("fp8_e4m3fnuz")
    q_fn = fn.quantize if path == "fused" else fn.quantize_reference
    q_nz = nz.quantize if path == "fused" else nz.quantize_reference
    (d_fn, s_fn), (d_nz, s_nz) = q_fn(x), q_nz(x)
    assert torch.equal(d_fn, d_nz) and torch.equal(s_nz.float(), s_fn.float() * 2)
    assert torch.equal(fn.dequantize(d_fn, s_fn, torch.float32), nz.dequantize(d_nz, s_nz, torch.float32))


@pytest.mark.parametrize("fmt, s_min", [("fp8_e4m3", S_MIN_FN), ("fp8_e4m3fnuz", S_MIN_FNUZ)])
def test_zero_row_is_canonical(fmt, s_min):
    x = torch.zeros(2, 1, 64)
    x[1, 0, ::3] = -0.0
    data, s = get_codec(fmt).quantize(x)
    assert int(data.max()) == 0 and s.float().reshape(-1).tolist() == [s_min, s_min]
    assert get_codec(fmt).dequantize(data, s, torch.float32).abs().max() == 0


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
def test_dequant_is_the_exact_product(fmt):
    """fp8(code) * s is exact in fp32 for every code and every finite bf16 s (4 x 8 significant
    bits, granularity >= 2^-142), subnormal scales included."""
    codec = get_codec(fmt)
    scales = [2.0**-133, 3 * 2.0**-133, 2.0**-126, 2.0**-125 * 1.5, 0.2236328125, 1.0, 30064771072.0, 2.0**100]
    data = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 64).repeat(len(scales), 1, 1)
    s = torch.tensor(scales).repeat_interleave(4).reshape(-1, 1, 1).to(torch.bfloat16)
    assert s.float().reshape(-1)[::4].tolist() == scales
    y = codec.dequantize_reference(data, s, torch.float32).reshape(len(scales), 256)
    vals = decode_lut(fmt.endswith("fnuz")).tolist()
    for i, sc in enumerate(scales):
        for code in range(256):
            want = vals[code] * sc  # exact in double
            got = y[i, code].item()
            assert (math.isnan(want) and math.isnan(got)) or got == want, (sc, code)


def test_layer_to_token_scale_exact_for_bf16_scales_only():
    x = torch.randn(8, 2, 64) * 30
    tensor_codec, token_codec = get_codec("fp8_e4m3_tensor"), get_codec("fp8_e4m3")
    for s in (1.0, 0.5, 2.0**-20, 0.15625, 3.0):
        data, layer = tensor_codec.quantize(x, s)
        d2, sc = layer_to_token_scale(data, s)
        assert sc.shape == (8, 2, 1) and sc.dtype == torch.bfloat16 and bool((sc.float() == s).all())
        want = tensor_codec.dequantize(data, layer, torch.float32)
        assert torch.equal(token_codec.dequantize(d2, sc, torch.float32), want)
    for bad in (0.05, 1 + 2.0**-9, 0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match=r"fp8_e4m3 pages take only a positive layer scale that is exactly a bf16"):
            layer_to_token_scale(data, bad)
