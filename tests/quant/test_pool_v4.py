"""Format v4 pool bytes: aligned code rows, scale rows in their own buffers, at the addresses
``kvformat/layout.py`` and ``docs/kv_format.md`` give; the Triton codecs write them in place."""
import os
import subprocess
import sys

import pytest
import torch

from sglang_memha.kvformat import KVFormat, get_codec
from sglang_memha.kvformat.layout import PoolLayout
from sglang_memha.kvformat.triton_kernels import triton_available

pytest.importorskip("sglang.srt.mem_cache.memory_pool")
from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


def make_pool(fmt, heads, head_dim, layers, page, size=256):
    cls = MemhaQuantKVPool.configured(fmt, "none", "test#0")
    return cls(size, page_size=page, dtype=torch.bfloat16, head_num=heads, head_dim=head_dim, layer_num=layers,
               device="cpu", enable_memory_saver=False)


def _byte_offset(buf: torch.Tensor, view: torch.Tensor) -> int:
    return view.data_ptr() - buf.data_ptr()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4_g64", "bf16"])
@pytest.mark.parametrize("heads, head_dim, page", [(3, 64, 1), (8, 128, 16), (1, 128, 1)])
def test_rows_are_aligned_and_scales_separate(fmt, heads, head_dim, page):
    """Every code row starts on a 16-byte boundary at any page size and head count (no padding:
    bytes per token are the format's), and a written token's scale sits at slot * H + head of
    its scale buffer."""
    pool = make_pool(fmt, heads, head_dim, 2, page)
    layout = PoolLayout(fmt, head_dim, heads, 2, page)
    for buf in pool.k_buffer + pool.v_buffer:
        assert buf.data_ptr() % 16 == 0 and buf.stride(1) * buf.element_size() % 16 == 0
    assert pool.bytes_per_token() == 2 * 2 * heads * layout.row.row_bytes  # no padding
    x = (torch.randn(5, heads * head_dim) * 3).bfloat16()
    loc = torch.tensor([7, 8, 9, 30, 31])
    pool.set_kv_buffer(_Layer(1), loc, x, x)
    data, scales = get_codec(fmt).quantize(x.view(5, heads, head_dim))
    flat = pool.k_buffer[1].view(-1)
    for i, s in enumerate(loc.tolist()):
        for h in range(heads):
            at = (s * heads + h) * layout.row.data_bytes
            assert torch.equal(flat[at:at + layout.row.data_bytes], data[i, h])
    if layout.row.has_scale_rows:
        raw = get_codec(fmt).scale_bytes(scales)
        flat_s = pool.k_scale_buffer[1].view(-1)
        for i, s in enumerate(loc.tolist()):
            at = s * heads * layout.row.scale_bytes
            assert torch.equal(flat_s[at:at + heads * layout.row.scale_bytes], raw[i].reshape(-1))
    else:
        assert pool.k_scale_buffer is None


def _doc_example() -> dict[str, int]:
    """The ``name = value`` lines of docs/kv_format.md's "Worked example (v4)" block."""
    text = open(os.path.join(ROOT, "docs", "kv_format.md")).read()
    start = text.index("Worked example (v4)")
    block = text[text.index("```", start) + 3:]
    block = block[block.index("\n") + 1:block.index("```")]
    out = {}
    for line in block.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            name, value = (p.strip() for p in line.split("=", 1))
            out[name] = int(value.split()[0].replace(",", "").replace("_", ""))
    return out


def test_doc_worked_example_matches_a_real_pool():
    """docs/kv_format.md's worked example (fp8_e4m3, head_dim 128, 8 KV heads, page 16, 28
    layers, slot 37, head 3) against the byte offsets of a real pool's rows and its published
    entries."""
    ex = _doc_example()
    pool = make_pool("fp8_e4m3", 8, 128, 28, 16, size=64)
    slot, head, layer = 37, 3, 5
    k, ks = pool.k_buffer[layer], pool.k_scale_buffer[layer]
    assert ex["data_bytes_per_head"] == k.shape[2] and ex["scale_bytes_per_head"] == ks.shape[2]
    assert ex["page"] == slot // 16
    assert ex["k_data_offset"] == _byte_offset(k, k[slot, head])
    assert ex["k_scale_offset"] == _byte_offset(ks, ks[slot, head])
    item = PoolLayout("fp8_e4m3", 128, 8, 28, 16).item_lens()
    ptrs, _, item_lens = pool.get_contiguous_buf_infos()
    assert item_lens == item
    page = ex["page"]
    assert (ex["page_data_start"], ex["page_data_end"]) == (page * item[0], (page + 1) * item[0])
    assert (ex["page_scale_start"], ex["page_scale_end"]) == (page * item[28], (page + 1) * item[28])
    for name, buf in (("k_data", k), ("k_scale", ks), ("v_data", pool.v_buffer[layer]),
                      ("v_scale", pool.v_scale_buffer[layer])):
        assert ptrs[ex[f"entry_{name}_layer5"]] == buf.data_ptr(), name


@pytest.mark.skipif(not triton_available(), reason="triton not installed")
def test_triton_write_fills_v4_buffers_in_place_under_interpreter():
    """The pool's CUDA write path (``triton_write``: Triton quantize-on-write straight into the
    v4 code and scale buffers) gives the bytes of its torch write, and the Triton page gather
    reads those buffers as the pool does; run here on CPU tensors under TRITON_INTERPRET=1 (fp32:
    the interpreter's bf16 handling is not the GPU's)."""
    script = f"""
import torch
from sglang_memha.kvformat.triton_kernels import dequantize_pages
from tests.quant.test_pool_v4 import make_pool, _Layer
for fmt in {[f.value for f in (KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ, KVFormat.INT8, KVFormat.INT4_G32)]}:
    a, b = make_pool(fmt, 2, 64, 2, 16), make_pool(fmt, 2, 64, 2, 16)
    a.dtype = b.dtype = torch.float32
    b.triton_write = True
    g = torch.Generator().manual_seed(1)
    loc = torch.tensor([3, 17, 18, 19, 64, 200])
    k, v = torch.randn(6, 128, generator=g) * 4, torch.randn(6, 128, generator=g)
    for p in (a, b):
        p.set_kv_buffer(_Layer(1), loc, k, v)
    for x, y in zip(a.layer_buffers(1), b.layer_buffers(1)):
        assert torch.equal(x, y), fmt
    pages = torch.tensor([12, 0, 1])  # the pages of loc, gathered out of order
    slots = (pages[:, None] * 16 + torch.arange(16)).reshape(-1)
    for data, scales, view in ((b.k_buffer[1], b.k_scale_buffer[1], b.get_key_buffer(1)),
                               (b.v_buffer[1], b.v_scale_buffer[1], b.get_value_buffer(1))):
        got = dequantize_pages(fmt, data, scales, pages, 16, 64, torch.float32)
        assert torch.allclose(got, view[slots], rtol=2.0**-22, atol=0), fmt  # int4: FMA may differ by 1 ulp
print("interpreter ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and "interpreter ok" in res.stdout, res.stderr[-3000:]
