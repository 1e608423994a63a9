"""int4_kivi's Triton kernels give the torch codec's bytes (``quantize_blocks``) and values
(``gather_dequantize``): on CPU under Triton's interpreter (a subprocess, so TRITON_INTERPRET=1 is
set before jit) and on a GPU when there is one."""

from __future__ import annotations

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.triton_kernels import kivi_dequantize_pages, kivi_quantize_blocks, triton_available

from .test_triton import run_interpreted

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
K = get_codec("int4_kivi", role="k")


def compare_kivi(head_dim: int, device: str, dtype: torch.dtype = torch.bfloat16, heads: int = 2,
                 hw: bool | None = None) -> None:
    """Blocks with fills 1, 17, 32 and 32 (one with a large per-channel offset, one all zero, one
    with -0): Triton bytes == quantize_blocks'; pages of 64 gathered out of order decode to the
    codec's values (int4's q * scale + min may be FMA-contracted on GPU: 1 ulp of fp32)."""
    g = torch.Generator().manual_seed(head_dim)
    blocks = torch.randn(4, 32, heads, head_dim, generator=g) * torch.logspace(-2, 1, head_dim)
    blocks[1] += torch.linspace(-30, 30, head_dim)  # channel offsets
    blocks[2] = 0.0
    blocks[2, ::3, 0, ::2] = -0.0
    blocks = blocks.to(dtype)
    fill = torch.tensor([1, 17, 32, 32])
    data, scales = K.quantize_blocks(blocks, fill)
    got_d, got_s = kivi_quantize_blocks(blocks.to(device), fill.to(device), hw=hw)
    assert torch.equal(got_d.cpu(), data), f"int4_kivi data bytes differ (D={head_dim}, {dtype})"
    assert torch.equal(got_s.cpu().view(torch.int16), scales.view(torch.int16)), "int4_kivi scale bytes differ"
    page = 64
    data_pool = torch.zeros(4 * page, heads, head_dim // 2, dtype=torch.uint8)
    scale_pool = torch.zeros(4 * page, heads, head_dim // 8, dtype=torch.uint8)
    data_pool[: 4 * 32] = data
    scale_pool[: 4 * 32] = K.scale_bytes(scales)
    pages = torch.tensor([1, 0, 3])
    ref = K.gather_dequantize(data_pool, scale_pool, pages, page, torch.float32)
    got = kivi_dequantize_pages(data_pool.to(device), scale_pool.to(device), pages.to(device), page, head_dim,
                                torch.float32).cpu()
    assert torch.allclose(got, ref, rtol=2.0**-22, atol=0), f"int4_kivi dequant differs (D={head_dim})"


_SCRIPT = """
import torch
from tests.kvformat.test_triton_kivi import compare_kivi
for d in (64, 96, 128):
    compare_kivi(d, "cpu")
compare_kivi(64, "cpu", dtype=torch.float32, heads=3)
print("interpreter ok")
"""


@needs_triton
def test_kivi_kernels_under_interpreter_match_torch():
    run_interpreted(_SCRIPT)


def test_kivi_launchers_check_arguments():
    if not triton_available():
        pytest.skip("triton not installed")
    with pytest.raises(ValueError, match=r"blocks=\(2, 16, 1, 64\) torch.float32: expected \[NB, 32, H, D\]"):
        kivi_quantize_blocks(torch.zeros(2, 16, 1, 64), torch.ones(2))
    pool, scales = torch.zeros(64, 1, 32, dtype=torch.uint8), torch.zeros(64, 1, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="page_size=16: expected a positive multiple of 32"):
        kivi_dequantize_pages(pool, scales, torch.zeros(1, dtype=torch.int64), 16, 64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_triton
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_kivi_kernels_on_gpu_match_torch(head_dim, dtype):
    compare_kivi(head_dim, "cuda", dtype=dtype, heads=8)
    compare_kivi(head_dim, "cuda", dtype=dtype, heads=8, hw=False)
