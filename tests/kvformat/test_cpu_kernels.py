"""The fused C quantize kernel writes exactly the bytes of the torch reference codec."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sglang_memha.kvformat import cpu_kernels, get_codec
from sglang_memha.kvformat.cpu_kernels import get_lib

needs_kernel = pytest.mark.skipif(get_lib() is None, reason="no C compiler: torch reference only")


@pytest.fixture(params=["native", "portable"])
def kernel_variant(request, monkeypatch):
    """native: the build the codecs use (-march=native; AVX-512 bf16 path where the CPU has it);
    portable: the same source without AVX-512, i.e. the plain C path every row falls back to."""
    if request.param == "portable":
        lib = cpu_kernels.build(cpu_kernels.FLAGS + ("-mno-avx512f",))
        if lib is None:
            pytest.skip("compiler rejects -mno-avx512f")
        monkeypatch.setattr(cpu_kernels, "_lib", lib)
    return request.param


_SEEDS = {"randn": 1, "heavy": 2, "wide_range": 3, "edges": 4, "scale_boundaries": 5}


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
    elif kind == "scale_boundaries":  # amax exactly 448 * b for a bf16 b (amax / C a bf16), one ulp either side, tiny
        k = torch.randint(-140, 60, (512, 3, 1), generator=g).float()
        m = torch.randint(0, 128, (512, 3, 1), generator=g).float()
        amax = 448.0 * (1 + m / 128) * torch.pow(2.0, k)
        step = 1 << 16 if dtype == torch.bfloat16 else 1  # one ulp of the input dtype
        ulp = torch.randint(-1, 2, (512, 3, 1), generator=g).to(torch.int32) * step
        amax = (amax.view(torch.int32) + ulp).view(torch.float32).clamp(max=2.0**64)
        x = torch.tanh(x) * amax      # |x| < amax ...
        x[..., 9] = amax[..., 0]      # ... except one element equal to it
        x[::13] *= 2.0**-100          # subnormal-fp32 amax rows
        x[7::13] = 0.0
    return x.to(dtype)


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["randn", "heavy", "wide_range", "edges", "scale_boundaries"])
def test_fused_equals_reference(fmt, dtype, kind, kernel_variant):
    codec = get_codec(fmt)
    x = _inputs(kind, dtype)
    d_ref, s_ref = codec.quantize_reference(x)
    d, s = codec.quantize(x)
    assert torch.equal(d, d_ref) and torch.equal(s, s_ref)


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
@pytest.mark.parametrize("head_dim", [8, 32, 40, 96, 128, 256])
def test_fused_equals_reference_other_head_dims(fmt, head_dim, kernel_variant):
    """Row lengths with and without the AVX-512 path (multiples of 32), over 60 orders of magnitude."""
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(300, 2, head_dim, generator=g) * torch.logspace(-40, 19, 300)[:, None, None]
    x = x.clamp(-(2.0**64), 2.0**64)
    x[::11] = 0.0
    codec = get_codec(fmt)
    for dtype in (torch.bfloat16, torch.float32):
        d_ref, s_ref = codec.quantize_reference(x.to(dtype))
        d, s = codec.quantize(x.to(dtype))
        assert torch.equal(d, d_ref) and torch.equal(s, s_ref), dtype


@needs_kernel
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0**65])
def test_fused_path_still_rejects_bad_input(bad):
    x = torch.randn(4, 2, 64)
    x[2, 1, 5] = bad
    with pytest.raises(ValueError, match=r"first at index \(2, 1, 5\)"):
        get_codec("fp8_e4m3").quantize(x)


def test_kernels_can_be_switched_off():
    code = ("import torch; from sglang_memha.kvformat.cpu_kernels import fp8_quantize_rows; "
            "assert fp8_quantize_rows(torch.zeros(1, 1, 64), 448.0, 7, 2.0**-126) is None")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MEMHA_CPU_KERNELS": "0"})


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
def test_quantize_into_preallocated_buffers(fmt):
    codec = get_codec(fmt)
    x = _inputs("heavy", torch.bfloat16)
    data = torch.full((512, 3, 64), 0xAB, dtype=torch.uint8)
    scale = torch.full((512, 3, 1), 12.5, dtype=torch.bfloat16)
    got = codec.quantize(x, out=(data, scale))
    d_ref, s_ref = codec.quantize_reference(x)
    assert got[0] is data and got[1] is scale
    assert torch.equal(data, d_ref) and torch.equal(scale, s_ref)


@needs_kernel
def test_quantize_into_rejects_wrong_buffers():
    x = torch.randn(4, 2, 64)
    with pytest.raises(ValueError, match=r"out=\(\(4, 2, 32\) torch.uint8"):
        get_codec("fp8_e4m3").quantize(x, out=(torch.empty(4, 2, 32, dtype=torch.uint8),
                                               torch.empty(4, 2, 1, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match=r"\(4, 2, 1\) torch.float32\): expected .* bf16 \(4, 2, 1\)"):
        get_codec("fp8_e4m3").quantize(x, out=(torch.empty(4, 2, 64, dtype=torch.uint8), torch.empty(4, 2, 1)))


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
def test_fused_dequant_equals_reference_on_every_code(fmt, kernel_variant):
    """All 256 codes (NaN codes included) times 1024 bf16 scales spread over all bit patterns
    (subnormals, S_MIN, large values that overflow bf16 to inf, inf and NaN scales)."""
    codec = get_codec(fmt)
    special = [1, 0x80, 0x81, 0x100, 0x3E65, 0x7F7F, 0x7F80, 0x7FC0, 0x8080, 0xFF7F]
    bits = torch.cat([torch.arange(0, 65536, 64), torch.tensor(special)])
    scale = bits.to(torch.int32).to(torch.int16).view(torch.bfloat16)  # two's complement wrap is the bit pattern
    n = scale.numel()
    codes = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 64).repeat(n, 3, 1)  # [4n, 3, 64]
    scale = scale.repeat_interleave(4).reshape(4 * n, 1, 1).repeat(1, 3, 1)
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


@needs_kernel
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz"])
@pytest.mark.parametrize("head_dim", [64, 128, 40])  # 40: not a multiple of 16, the table path
def test_gather_dequant_equals_gather_then_dequantize(fmt, head_dim, kernel_variant):
    """Pool code rows and bf16 scale rows (format v4's two buffers) gathered by slot and
    dequantized in one pass: the bytes of ``codec.dequantize`` of the gathered rows (repeated,
    unordered and int32 slots too)."""
    codec = get_codec(fmt)
    x = _inputs("heavy", torch.bfloat16)[:, :, :1].repeat(1, 1, head_dim) * torch.randn(head_dim)
    data, scale = codec.quantize(x.to(torch.bfloat16))
    raw = scale.contiguous().view(torch.uint8).reshape(*data.shape[:2], 2)  # [512, 3, 2]
    slots = torch.tensor([5, 0, 511, 5, 77, 300, 1], dtype=torch.int32)
    got = cpu_kernels.fp8_gather_dequantize_bf16(data, raw, slots, head_dim, codec.bias)
    want = codec.dequantize_reference(data[slots.long()], scale[slots.long()], torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    assert cpu_kernels.fp8_gather_dequantize_bf16(data, raw, slots[:0], head_dim, codec.bias).shape == (0, 3, head_dim)
    with pytest.raises(IndexError, match=r"out of range \[0, 512\): min 0, max 512"):
        cpu_kernels.fp8_gather_dequantize_bf16(data, raw, torch.tensor([0, 512]), head_dim, codec.bias)
