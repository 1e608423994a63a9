"""The fused C quantize kernel writes exactly the bytes of the torch reference codec."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.cpu_kernels import get_lib

needs_kernel = pytest.mark.skipif(get_lib() is None, reason="no C compiler: torch reference only")


_SEEDS = {"randn": 1, "heavy": 2, "wide_range": 3, "edges": 4}


def _inputs(kind: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(_SEEDS[kind])
    x = torch.randn(512, 3, 64, generator=g)
    if kind == "heavy":
        x = x / torch.rand(512, 3, 64, generator=g).clamp_min(1e-3) ** 1.5
    elif kind == "wide_range":
        x = x * torch.logspace(-30, 15, 512)[:, None, None]
    elif kind == "edges":
        x[::5] = 0.0
        x[1::7] = -0.0
        x[2::9, :, 7] = 3e5          # one outlier per row: most values go subnormal
        x[3::11] = 448.0              # exact max, ties at the top
    return x.to(dtype)


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["randn", "heavy", "wide_range", "edges"])
def test_fused_equals_reference(fmt, dtype, kind):
    codec = get_codec(fmt)
    x = _inputs(kind, dtype)
    d_ref, s_ref = codec.quantize_reference(x)
    d, s = codec.quantize(x)
    assert torch.equal(d, d_ref) and torch.equal(s, s_ref)


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0**65])
def test_fused_path_still_rejects_bad_input(bad):
    x = torch.randn(4, 2, 64)
    x[2, 1, 5] = bad
    with pytest.raises(ValueError, match=r"first at index \(2, 1, 5\)"):
        get_codec("fp8_e4m3").quantize(x)


def test_kernels_can_be_switched_off():
    code = ("import torch; from sglang_memha.kvformat.cpu_kernels import fp8_quantize_rows; "
            "assert fp8_quantize_rows(torch.zeros(1, 1, 64), 448.0, 7) is None")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MEMHA_CPU_KERNELS": "0"})


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
def test_quantize_into_preallocated_buffers(fmt):
    codec = get_codec(fmt)
    x = _inputs("heavy", torch.bfloat16)
    data = torch.full((512, 3, 64), 0xAB, dtype=torch.uint8)
    scale = torch.full((512, 3, 1), -1.0)
    got = codec.quantize(x, out=(data, scale))
    d_ref, s_ref = codec.quantize_reference(x)
    assert got[0] is data and got[1] is scale
    assert torch.equal(data, d_ref) and torch.equal(scale, s_ref)


@needs_kernel
def test_quantize_into_rejects_wrong_buffers():
    x = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match=r"out=\(\(4, 2, 32\) torch.uint8"):
        get_codec("fp8_e4m3").quantize(x, out=(torch.empty(4, 2, 32, dtype=torch.uint8), torch.empty(4, 2, 1)))


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
def test_fused_dequant_equals_reference_on_every_code(fmt):
    """All 256 codes (NaN codes included) times scales from tiny to huge, incl. 0 and bf16 rounding ties."""
    codec = get_codec(fmt)
    codes = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 64).repeat(64, 3, 1)  # [256, 3, 64]
    g = torch.Generator().manual_seed(1)
    scale = torch.exp(torch.empty(256, 3, 1).uniform_(-60, 60, generator=g))
    scale[::17] = 0.0
    scale[1::19] = 1.0 + 2.0**-8   # products land on bf16 ties
    got = codec.dequantize(codes, scale, torch.bfloat16)
    ref = codec.dequantize_reference(codes, scale, torch.bfloat16)
    # NaN codes (never written by our encoders) decode to NaN; NaN payload bits are unspecified.
    nan = ref.isnan()
    assert nan.any() and torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], ref.view(torch.int16)[~nan])


@needs_kernel
def test_fused_round_trip_matches_reference_on_real_shapes():
    codec = get_codec("fp8_e4m3")
    x = _inputs("heavy", torch.bfloat16)
    data, scale = codec.quantize(x)
    assert torch.equal(codec.dequantize(data, scale).view(torch.int16),
                       codec.dequantize_reference(data, scale).view(torch.int16))
