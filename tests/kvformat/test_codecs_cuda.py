"""The torch codecs on a CUDA device write the bytes they write on CPU (what a GPU prefill runs
for the formats the Triton kernels do not cover, and for send-time conversion on its device)."""
from __future__ import annotations

import pytest
import torch

from sglang_memha.kvformat import KVFormat, get_codec
from sglang_memha.kvformat.transforms import apply_k_transform

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _inputs(head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(97, 4, head_dim, generator=g) * torch.logspace(-3, 2, head_dim)
    x[0] = 0
    x[1, :, 5] = 300.0  # an outlier channel
    x[2, 0] = -x[2, 0].abs()  # an all-negative row
    x[3, 1] *= 2.0**-100  # tiny values
    return x.to(dtype)


@pytest.mark.parametrize("fmt", list(KVFormat), ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("k_transform", ["none", "hadamard"])
def test_torch_codec_bytes_equal_on_cuda_and_cpu(fmt, dtype, k_transform):
    codec = get_codec(fmt, role="k")  # int4_kivi(_g64)'s V is int4_g32's (g64's) codec, covered by its own case
    x = _inputs(128, dtype)
    if not codec.spec.token_local:
        x = x[:96]  # whole 32-token blocks
    x_cpu = apply_k_transform(k_transform, x)
    x_gpu = apply_k_transform(k_transform, x.cuda())
    if k_transform != "none":  # the rotation itself: same fp32 arithmetic, up to summation order
        torch.testing.assert_close(x_gpu.cpu().float(), x_cpu.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=1e-6)
        x_gpu = x_cpu.cuda()  # compare the codec on identical inputs
    d_cpu, s_cpu = codec.quantize(x_cpu)
    d_gpu, s_gpu = codec.quantize(x_gpu)
    assert torch.equal(d_gpu.cpu(), d_cpu), f"{fmt} data bytes differ"
    raw_cpu, raw_gpu = codec.scale_bytes(s_cpu), codec.scale_bytes(s_gpu)
    assert (raw_cpu is None) == (raw_gpu is None)
    if raw_cpu is not None:
        assert torch.equal(raw_gpu.cpu(), raw_cpu), f"{fmt} scale bytes differ"
    y_cpu = codec.dequantize(d_cpu, s_cpu, torch.float32)
    y_gpu = codec.dequantize(d_gpu, s_gpu, torch.float32).cpu()
    # int4's q * scale + min may be FMA-contracted on GPU: 1 ulp of fp32
    assert torch.allclose(y_gpu, y_cpu, rtol=2.0**-22, atol=0), f"{fmt} dequantized values differ"
