"""The fp8 E8M0 scale rule (FORMAT_VERSION 2): k is the smallest integer with amax <= C * 2^k,
e = clamp(k + 127, E_MIN, 254), checked against exact rational arithmetic at the boundaries, and
through both quantize paths (fused C kernel and torch reference)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.fp8 import decode_lut, e8m0_exponent, e8m0_to_f32, layer_to_token_scale

# (format, C, E_MIN)
RULES = [("fp8_e4m3", 448.0, 0), ("fp8_e4m3fnuz", 224.0, 1)]


def exact_e(amax: float, c: float, e_min: int) -> int:
    """The rule in exact arithmetic: smallest k with amax <= c 2^k, then e = clamp(k + 127)."""
    if amax == 0:
        return e_min
    a = Fraction(amax)
    k = math.floor(math.log2(amax / c)) - 2  # safely below the answer, then walk up exactly
    while a > c * Fraction(2) ** k:
        k += 1
    return min(max(k + 127, e_min), 254)


def f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float32).item()


def next_up(v: float) -> float:
    return torch.nextafter(torch.tensor(v), torch.tensor(math.inf)).item()


def next_down(v: float) -> float:
    return torch.nextafter(torch.tensor(v), torch.tensor(0.0)).item()


def boundary_amaxes(c: float) -> list[float]:
    vals = [0.0, 2.0**-149, 2.0**-140, next_down(2.0**-126), 2.0**-126, 2.0**-100, 1.0, 2.0**64, next_down(2.0**64)]
    for k in range(-150, 57):
        b = f32(c * 2.0**k)
        if 0 < b <= 2.0**64:
            vals += [b, next_up(b), next_down(b)]
    return [v for v in vals if v <= 2.0**64]


@pytest.mark.parametrize("fmt, c, e_min", RULES)
def test_exponent_is_exact_at_every_boundary(fmt, c, e_min):
    amax = boundary_amaxes(c)
    got = e8m0_exponent(torch.tensor(amax, dtype=torch.float32), c, e_min).tolist()
    want = [exact_e(a, c, e_min) for a in amax]
    bad = [(a, g, w) for a, g, w in zip(amax, got, want) if g != w]
    assert not bad, bad[:5]


@pytest.mark.parametrize("fmt, c, e_min", RULES)
def test_exponent_is_exact_on_random_bit_patterns(fmt, c, e_min):
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(0, 0x5F800001, (4000,), generator=g, dtype=torch.int64).to(torch.int32)  # [0, 2^64]
    amax = bits.view(torch.float32)
    got = e8m0_exponent(amax, c, e_min).tolist()
    assert got == [exact_e(a, c, e_min) for a in amax.tolist()]


def test_named_cases():
    e = lambda a, c=448.0, e_min=0: int(e8m0_exponent(torch.tensor([a]), c, e_min))  # noqa: E731
    assert e(448.0) == 127 and e(next_up(448.0)) == 128 and e(next_down(448.0)) == 127
    assert e(224.0) == 126 and e(next_up(224.0)) == 127  # (224, 448] -> k = 0
    assert e(2.0**64) == 183  # 2^64 / 2^56 = 256 <= 448 < 512
    assert e(2.0**64, 224.0, 1) == 184
    assert e(100.0) == 125  # worked example: 100 / 2^-2 = 400
    assert e(0.0) == 0 and e(2.0**-149) == 0 and e(448.0 * 2.0**-127) == 0 and e(next_up(448.0 * 2.0**-127)) == 1
    assert e(0.0, 224.0, 1) == 1 and e(224.0 * 2.0**-126, 224.0, 1) == 1


@pytest.mark.parametrize("fmt, c, e_min", RULES)
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_quantize_writes_the_rule(fmt, c, e_min, path):
    codec = get_codec(fmt)
    amax = boundary_amaxes(c)
    x = torch.zeros(len(amax), 1, 64)
    x[:, 0, 3] = torch.tensor(amax)
    x[:, 0, 5] = -torch.tensor(amax) / 3  # smaller elements of both signs
    x[::2, 0, 3] *= -1  # the amax element negative in every other row
    q = codec.quantize if path == "fused" else codec.quantize_reference
    data, e = q(x)
    assert e.dtype == torch.uint8 and e.shape == (len(amax), 1, 1)
    assert e.reshape(-1).tolist() == [exact_e(a, c, e_min) for a in amax]
    # the amax element scales into (C/2, C] and rounds into [C/2, C], unless e is clamped at E_MIN
    y = codec.dequantize(data, e, torch.float32)
    top = decode_lut(fmt.endswith("fnuz"))[data[:, 0, 3].long()].abs()
    unclamped = e.reshape(-1) > e_min
    assert bool((top[unclamped] >= c / 2).all()) and bool((top[unclamped] <= c).all())
    rel = ((y[:, 0, 3] - x[:, 0, 3]).abs() <= x[:, 0, 3].abs() * 2.0**-4)
    assert bool(rel[unclamped].all())


@pytest.mark.parametrize("path", ["fused", "reference"])
def test_fnuz_writes_the_fn_codes_with_exponent_plus_one(path):
    """For every input (the E_MIN clamps included): same code bytes, fnuz e = fn e + 1."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(600, 2, 64, generator=g) * torch.logspace(-45, 18, 600)[:, None, None]
    x[::7] = 0.0
    fn, nz = get_codec("fp8_e4m3"), get_codec("fp8_e4m3fnuz")
    q_fn = fn.quantize if path == "fused" else fn.quantize_reference
    q_nz = nz.quantize if path == "fused" else nz.quantize_reference
    (d_fn, e_fn), (d_nz, e_nz) = q_fn(x), q_nz(x)
    assert torch.equal(d_fn, d_nz) and torch.equal(e_nz.int(), e_fn.int() + 1)
    assert torch.equal(fn.dequantize(d_fn, e_fn, torch.float32), nz.dequantize(d_nz, e_nz, torch.float32))


@pytest.mark.parametrize("fmt, e_min", [("fp8_e4m3", 0), ("fp8_e4m3fnuz", 1)])
def test_zero_row_is_canonical(fmt, e_min):
    x = torch.zeros(2, 1, 64)
    x[1, 0, ::3] = -0.0
    data, e = get_codec(fmt).quantize(x)
    assert int(data.max()) == 0 and e.reshape(-1).tolist() == [e_min, e_min]
    assert get_codec(fmt).dequantize(data, e, torch.float32).abs().max() == 0


def test_smallest_scale_decodes_exactly_and_255_is_nan():
    codec = get_codec("fp8_e4m3")
    data = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 64)
    zero_e = torch.zeros(4, 1, 1, dtype=torch.uint8)
    y = codec.dequantize_reference(data, zero_e, torch.float32).reshape(-1)
    vals = decode_lut(False).tolist()
    for c in range(256):
        want = vals[c] * 2.0**-127  # exact in double; also exact in fp32 (>= 2^-136)
        assert (math.isnan(want) and math.isnan(y[c])) or y[c].item() == want
    assert e8m0_to_f32(torch.tensor([255], dtype=torch.uint8)).isnan().all()
    assert e8m0_to_f32(torch.tensor([0, 1, 127, 254], dtype=torch.uint8)).tolist() == [2.0**-127, 2.0**-126, 1.0, 2.0**127]


def test_layer_to_token_scale_exact_for_powers_of_two_only():
    x = torch.randn(8, 2, 64) * 30
    tensor_codec, token_codec = get_codec("fp8_e4m3_tensor"), get_codec("fp8_e4m3")
    for s in (1.0, 0.5, 2.0**-20):
        data, layer = tensor_codec.quantize(x, s)
        d2, e = layer_to_token_scale(data, s)
        assert e.shape == (8, 2, 1) and bool((e == int(math.log2(s)) + 127).all())
        assert torch.equal(token_codec.dequantize(d2, e, torch.float32), tensor_codec.dequantize(data, layer, torch.float32))
    with pytest.raises(ValueError, match=r"layer_scale=0.05: fp8_e4m3 pages take only a power-of-two"):
        layer_to_token_scale(data, 0.05)
