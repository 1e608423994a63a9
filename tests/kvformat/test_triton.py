"""Triton kernels produce the torch codecs' bytes: on a GPU when there is one, and on CPU under
Triton's interpreter (TRITON_INTERPRET=1, in a subprocess so the flag is set before jit)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sglang_memha.kvformat import KVFormat, get_codec, page_geometry
from sglang_memha.kvformat.triton_kernels import TRITON_FORMATS, dequantize_pages, quantize_to_slots, triton_available

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def compare(fmt, head_dim: int, device: str, tokens: int = 6, heads: int = 2, page: int = 4,
            dtype: torch.dtype = torch.bfloat16, rows: int = 16, hw: bool | None = None) -> None:
    """Triton bytes == torch codec bytes; ``rows`` (rows per program) so that the row tiles
    end both inside and at the edge of the [tokens * heads] grid."""
    codec = get_codec(fmt)
    geo = page_geometry(fmt, page, heads, head_dim)
    g = torch.Generator().manual_seed(head_dim)
    x = torch.randn(tokens, heads, head_dim, generator=g) * torch.logspace(-3, 2, head_dim)
    x[0] = 0
    # fp8 E8M0 boundaries: amax exactly 448 * 2^-3, one bf16 ulp above it, and a subnormal-fp32 row.
    # Triton's interpreter flushes bf16 subnormals to zero in conversions (loads of bf16 x, int4's
    # bf16 scale stores), so on CPU that row is kept only for fp32 x and the non-int4 formats.
    x[1] = torch.rand(heads, head_dim, generator=g) * 80 - 40
    x[1, 0, 3], x[1, 1, 3] = 56.0, -56.25
    x[2, 0] *= 2.0**-140
    x = x.to(dtype)
    if device == "cpu" and (dtype == torch.bfloat16 or codec.spec.scale_dtype == "bf16x2"):
        x[2, 0] = 0
    slots = 4 * page
    pools = [torch.zeros(slots, heads, n, dtype=torch.uint8) for n in (geo.data_bytes_per_head, geo.scale_bytes_per_head)]
    loc = torch.randperm(slots, generator=g)[:tokens]
    codec.quantize_into(x, loc, *pools)
    dev_pools = [torch.zeros_like(p, device=device) for p in pools]
    quantize_to_slots(fmt, x.to(device), loc.to(device), *dev_pools, rows_per_program=rows, hw=hw)
    assert torch.equal(dev_pools[0].cpu(), pools[0]), f"{fmt} data bytes differ"
    assert torch.equal(dev_pools[1].cpu(), pools[1]), f"{fmt} scale bytes differ"
    pages = torch.tensor([2, 0, 3])
    ref = codec.gather_dequantize(*pools, pages, page, torch.float32)
    got = dequantize_pages(fmt, *dev_pools, pages.to(device), page, head_dim, torch.float32, rows_per_program=rows,
                           hw=hw).cpu()
    # int4's q * scale + min may be FMA-contracted on GPU: 1 ulp of fp32
    assert torch.allclose(got, ref, rtol=2.0**-22, atol=0), f"{fmt} dequant differs"


_SCRIPT = """
import torch
from tests.kvformat.test_triton import compare
from sglang_memha.kvformat.triton_kernels import TRITON_FORMATS
for fmt in TRITON_FORMATS:
    for d in (64, 96, 128):
        if d % get_codec(fmt).spec.head_dim_multiple == 0:
            compare(fmt, d, "cpu")
    compare(fmt, 64, "cpu", dtype=torch.float32, rows=4)
    compare(fmt, 64, "cpu", rows=1)
print("interpreter ok")
""".replace("import torch", "import torch\nfrom sglang_memha.kvformat import get_codec")


def run_interpreted(script: str) -> None:
    """Run ``script`` (which prints "interpreter ok" at the end) with TRITON_INTERPRET=1 in a fresh
    process: the flag must be set before Triton compiles anything."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "interpreter ok" in res.stdout, res.stderr[-3000:]


@needs_triton
def test_kernels_under_interpreter_match_torch_bytes():
    run_interpreted(_SCRIPT)


def test_launchers_check_arguments():
    if not triton_available():
        pytest.skip("triton not installed")
    geo = page_geometry("int8", 4, 2, 64)
    pool = torch.zeros(8, 2, geo.data_bytes_per_head, dtype=torch.uint8)
    bad_scales = torch.zeros(8, 2, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"scale_pool=\(8, 2, 3\) torch.uint8: expected contiguous uint8 \[num_slots, num_kv_heads, 4\]"):
        quantize_to_slots("int8", torch.zeros(2, 2, 64), torch.zeros(2, dtype=torch.int64), pool, bad_scales)
    with pytest.raises(ValueError, match="fmt=bf16: Triton kernels cover"):
        dequantize_pages("bf16", pool, bad_scales, torch.zeros(1, dtype=torch.int64), 4, 64)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("fmt", TRITON_FORMATS, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_kernels_on_gpu_match_torch_bytes(fmt, head_dim, dtype, rows):
    # 61 tokens x 8 heads = 488 rows: the last tile of 16 or 64 rows is partial
    compare(fmt, head_dim, "cuda", tokens=61, heads=8, page=16, dtype=dtype, rows=rows)
    # also the integer-arithmetic rounding and fp8 encoding the interpreter (and older GPUs) run
    compare(fmt, head_dim, "cuda", tokens=61, heads=8, page=16, dtype=dtype, rows=rows, hw=False)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("hw", [True, False], ids=["hw", "integer"])
@pytest.mark.parametrize("fmt", [KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ], ids=str)
def test_fp8_every_code_and_every_tie_on_gpu(fmt, hw):
    """fp8 through the GPU's e4m3fn conversion instructions and through the integer encoder:
    every value the format writes and every midpoint between neighbours (RNE ties), positive and
    negative, give the codec's bytes. Each row holds C (448 fn, 224 fnuz), so its scale is exactly
    1 and x is encoded as is."""
    if torch.cuda.get_device_capability() < (8, 9) and hw:
        pytest.skip("no fp8 conversion instructions before sm_89")
    c = get_codec(fmt).clamp
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = vals[torch.isfinite(vals)].unique()  # 253 values (-0 == 0)
    if fmt == KVFormat.FP8_E4M3FNUZ:
        vals = vals / 2  # fnuz's grid, up to its clamp 224
    mids = (vals[1:] + vals[:-1]) / 2  # exact in fp32 (4 significant bits)
    x = torch.cat([vals, mids])
    rows = -(-x.numel() // 127)
    x = torch.cat([x, torch.zeros(rows * 127 - x.numel())]).reshape(rows, 1, 127)
    x = torch.cat([x, torch.full((rows, 1, 1), c)], dim=2)  # head_dim 128
    compare_rows(fmt, x, hw)


def compare_rows(fmt, x: torch.Tensor, hw) -> None:
    codec = get_codec(fmt)
    geo = page_geometry(fmt, 1, x.shape[1], x.shape[2])
    loc = torch.arange(x.shape[0])
    pools = [torch.zeros(x.shape[0], x.shape[1], n, dtype=torch.uint8) for n in (geo.data_bytes_per_head, geo.scale_bytes_per_head)]
    codec.quantize_into(x, loc, *pools)
    dev = [p.cuda() * 0 for p in pools]
    quantize_to_slots(fmt, x.cuda(), loc.cuda(), *dev, hw=hw)
    assert torch.equal(dev[0].cpu(), pools[0]) and torch.equal(dev[1].cpu(), pools[1])
    got = dequantize_pages(fmt, *dev, loc.cuda(), 1, x.shape[2], torch.float32, hw=hw).cpu()
    assert torch.equal(got, codec.gather_dequantize(*pools, loc, 1, torch.float32))
