"""``decode_attention`` against a torch reference: gather each request's rows by slot id,
dequantize them with the project's codec, softmax attention in fp32 (GQA by repeat).

The reference sees the same dequantized values as the kernel, so in fp32 the two differ only by
fp32 rounding (summation order, scales applied to logits instead of keys): rtol = atol = 1e-4.
On CPU the kernel runs under Triton's interpreter (in a subprocess, TRITON_INTERPRET=1, fp32 q:
the interpreter's bf16 dot is wrong); on a GPU also with bf16 q (tolerance below).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from sglang_memha.attention.decode import DECODE_FORMATS, decode_attention, default_num_kv_splits
from sglang_memha.kvformat import get_codec, page_geometry
from tests.kvformat.test_triton import run_interpreted

try:
    import triton  # noqa: F401
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton not installed")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
RTOL = ATOL = 1e-4  # fp32 q, kernel vs reference of the same dequantized values


def make_case(fmt, lens, page, head_dim, num_kv_heads, group, dtype=torch.float32, seed=0, idx_dtype=torch.int32):
    """Pools of one layer holding random K/V, requests of ``lens`` tokens on scattered pages of
    ``page`` slots, q -> dict of decode_attention's arguments."""
    g = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // page) for n in lens) + 3  # a few pages nobody uses
    slots = num_pages * page
    geo = page_geometry(fmt, page, num_kv_heads, head_dim)
    codec = get_codec(fmt)
    bufs = {}
    for side in "kv":
        spread = 1.0 + torch.rand(slots, num_kv_heads, 1, generator=g)  # rows of different scales
        x = torch.randn(slots, num_kv_heads, head_dim, generator=g) * spread
        if side == "k":
            x = x + torch.randn(head_dim, generator=g)  # a per-channel offset, as real K has
        data = torch.zeros(slots, num_kv_heads, geo.data_bytes_per_head, dtype=torch.uint8)
        scale = torch.zeros(slots, num_kv_heads, geo.scale_bytes_per_head, dtype=torch.uint8) \
            if geo.scale_bytes_per_head else None
        codec.quantize_into(x, torch.arange(slots), data, scale)
        bufs[side] = (data, scale)
    perm = torch.randperm(num_pages, generator=g).tolist()
    indices, indptr = [], [0]
    for n in lens:
        pages = [perm.pop() for _ in range(-(-n // page))]
        indices += [p * page + o for p in pages for o in range(page)][:n]
        indptr.append(len(indices))
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=g).to(dtype)
    return dict(fmt=fmt, q=q, k_data=bufs["k"][0], k_scale=bufs["k"][1], v_data=bufs["v"][0], v_scale=bufs["v"][1],
                kv_indptr=torch.tensor(indptr, dtype=torch.int32), kv_indices=torch.tensor(indices, dtype=idx_dtype),
                sm_scale=1.0 / math.sqrt(head_dim))


def reference(fmt, q, k_data, k_scale, v_data, v_scale, kv_indptr, kv_indices, sm_scale, logit_cap=0.0, **_):
    codec = get_codec(fmt)
    hq, hkv = q.shape[1], k_data.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float32)
    for b in range(q.shape[0]):
        idx = kv_indices[int(kv_indptr[b]):int(kv_indptr[b + 1])].long().cpu()
        if idx.numel() == 0:
            continue
        kv = []
        for data, scale in ((k_data, k_scale), (v_data, v_scale)):
            scales = None if scale is None else codec.scales_from_bytes(scale.cpu()[idx])
            x = codec.dequantize(data.cpu()[idx], scales, torch.float32)  # [n, Hkv, D]
            kv.append(x.repeat_interleave(hq // hkv, dim=1))  # [n, Hq, D]
        logits = torch.einsum("hd,nhd->hn", q[b].float().cpu(), kv[0]) * sm_scale
        if logit_cap > 0:
            logits = logit_cap * torch.tanh(logits / logit_cap)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(logits, dim=-1), kv[1])
    return out


def check(fmt, lens, page, head_dim, num_kv_heads, group, device="cpu", dtype=torch.float32, rtol=RTOL, atol=ATOL,
          **kw):
    case = make_case(fmt, lens, page, head_dim, num_kv_heads, group, dtype=dtype,
                     idx_dtype=kw.pop("idx_dtype", torch.int32))
    ref = reference(**case, logit_cap=kw.get("logit_cap", 0.0))
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    got = decode_attention(**args, out_dtype=torch.float32, **kw).cpu()
    err = (got - ref).abs().max().item()
    assert torch.allclose(got, ref, rtol=rtol, atol=atol), \
        f"{fmt} lens={lens} page={page} D={head_dim} Hkv={num_kv_heads} group={group} {kw}: max err {err}"


# The interpreter grid, combined rather than crossed: every format meets both head_dims, both
# group sizes (1 and 4) and every page size (1, 16, 32); lengths 1, 17, 100, 300 in one batch
# cross BLOCK_N = 16 tiles and split boundaries (4 splits: 300 -> 80-token splits; 3 -> 112).
# About 50 s on 2 shared cores (kernel vs reference: max error ~5e-7 in fp32).
INTERP_CASES = [
    # (lens, page, head_dim, num_kv_heads, group, num_kv_splits)
    ([1, 17, 100, 300], 16, 64, 1, 4, 4),
    ([300, 17], 1, 128, 2, 1, 3),
    ([100, 33], 32, 128, 1, 4, None),
    ([64, 1], 32, 64, 2, 1, 1),
]

_SCRIPT = """
from tests.attention.test_decode_kernel import INTERP_CASES, check, reference
from sglang_memha.attention.decode import DECODE_FORMATS
for i, fmt in enumerate(DECODE_FORMATS):
    for lens, page, d, hkv, group, splits in INTERP_CASES:
        check(fmt.value, lens, page, d, hkv, group, num_kv_splits=splits, block_n=16)
    # block_n 32, int64 slot ids, a request with no tokens (o = 0)
    if i % 2 == 0:
        check(fmt.value, [40, 0, 5], 16, 64, 1, 2, num_kv_splits=2, block_n=32, idx_dtype=__import__("torch").int64)
    else:  # soft-capped logits (cap 1: most logits of these cases are past it)
        check(fmt.value, [100, 17], 16, 64, 2, 2, num_kv_splits=2, block_n=16, logit_cap=1.0)
c = __import__("tests.attention.test_decode_kernel", fromlist=["make_case"]).make_case("fp8_e4m3", [100, 17], 16, 64, 2, 2)
assert (reference(**c, logit_cap=1.0) - reference(**c)).abs().max() > 1e-2  # the cap bites in those cases
print("interpreter ok")
"""


@needs_triton
def test_decode_under_interpreter_matches_reference():
    run_interpreted(_SCRIPT)


def test_k_offset_cancels_in_softmax():
    """Why the kernel needs no K-offset correction: q . (k + c) = q . k + q . c, and q . c is one
    constant per query row, which softmax removes."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, n, 64, generator=g, dtype=torch.float64) for n in (1, 50, 50))
    c = torch.randn(64, generator=g, dtype=torch.float64) * 10
    attn = lambda kk: torch.softmax(q @ kk.transpose(1, 2) / 8, dim=-1) @ v  # noqa: E731
    assert torch.allclose(attn(k + c), attn(k), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(q @ (k + c).transpose(1, 2), q @ k.transpose(1, 2))  # the logits do move


@needs_triton
def test_launcher_checks_arguments():
    case = make_case("fp8_e4m3", [5, 3], 4, 64, 2, 2)
    bad = {
        "q": case["q"].double(),
        "k_data": case["k_data"][:, :, :32],
        "v_data": case["v_data"][:-1],
        "k_scale": None,
        "v_scale": case["v_scale"].view(torch.bfloat16),
        "kv_indptr": case["kv_indptr"].long(),
        "kv_indices": case["kv_indices"].float(),
        "sm_scale": -1.0,
        "num_kv_splits": 0,
        "block_n": 24,
        "out": torch.zeros(2, 4, 32),
        "logit_cap": -1.0,
    }
    for name, value in bad.items():
        with pytest.raises(ValueError, match=rf"^{name}="):
            decode_attention(**{**case, name: value})
    with pytest.raises(ValueError, match="^fmt=bfp8"):
        decode_attention(**{**case, "fmt": "bfp8"})
    with pytest.raises(ValueError, match="^k_scale=.*expected None"):
        bf = make_case("bf16", [5], 4, 64, 2, 2)
        decode_attention(**{**bf, "k_scale": case["k_scale"]})
    with pytest.raises(ValueError, match="num_q_heads must be a multiple"):
        decode_attention(**{**case, "q": torch.zeros(2, 3, 64)})
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="^q on cpu: expected CUDA tensors"):
            decode_attention(**case)


def test_default_num_kv_splits():
    assert [default_num_kv_splits(n) for n in (0, 1, 64, 65, 300, 10**6)] == [1, 1, 1, 2, 5, 16]


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("fmt", [f.value for f in DECODE_FORMATS])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("page,group", [(1, 1), (16, 4), (32, 8)])
@pytest.mark.parametrize("hw", [None, False], ids=["hw", "integer"])
def test_decode_on_gpu_matches_reference(fmt, head_dim, page, group, hw):
    lens = [1, 17, 100, 300, 1000, 4097]
    if hw is False and not fmt.startswith("fp8"):
        pytest.skip("hw only changes fp8 decoding")
    check(fmt, lens, page, head_dim, 2, group, device="cuda", hw=hw)
    check(fmt, lens, page, head_dim, 2, group, device="cuda", hw=hw, num_kv_splits=1)
    # bf16 q: dots in bf16 (q, int4 values and the softmax weights rounded to bf16)
    check(fmt, lens, page, head_dim, 2, group, device="cuda", hw=hw, dtype=torch.bfloat16, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("fmt", [f.value for f in DECODE_FORMATS if f.value != "bf16"])
def test_write_and_decode_capture_and_replay_under_cuda_graphs(fmt):
    """One decode step as the server runs it under CUDA graphs: quantize-on-write of the step's
    new K/V rows (Triton codecs, in place) then decode attention, captured once and replayed with
    new q / K / V copied into the static inputs; each replay equals the same calls run eagerly on a
    copy of the pools (bit for bit: same kernels, same launch shapes)."""
    from sglang_memha.kvformat.triton_kernels import quantize_to_slots

    case = make_case(fmt, [300, 17, 1000], 16, 128, 2, 4, dtype=torch.bfloat16)
    cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    last = (cuda["kv_indptr"][1:] - 1).long()  # each request's newest token: the slot this step writes
    loc = cuda["kv_indices"][last].long()
    g = torch.Generator(device="cuda").manual_seed(1)
    hkv, d = cuda["k_data"].shape[1], 128
    new_k, new_v = (torch.empty(3, hkv, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = cuda["q"].clone()
    out = torch.empty(q.shape, dtype=torch.float32, device="cuda")

    def step(pools, q_in, k_in, v_in, out_t):
        kd, ks, vd, vs = pools
        quantize_to_slots(fmt, k_in, loc, kd, ks)
        quantize_to_slots(fmt, v_in, loc, vd, vs)
        decode_attention(fmt, q_in, kd, ks, vd, vs, cuda["kv_indptr"], cuda["kv_indices"], cuda["sm_scale"],
                         num_kv_splits=8, max_kv_len=1000, out=out_t, out_dtype=torch.float32)

    graph_pools = [cuda[n] for n in ("k_data", "k_scale", "v_data", "v_scale")]
    eager_pools = [t.clone() for t in graph_pools]
    for t in (new_k, new_v, q):
        t.copy_(torch.randn(t.shape, device="cuda", generator=g))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (Triton compiles) outside the capture
        step([t.clone() for t in graph_pools], q, new_k, new_v, out)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_pools, q, new_k, new_v, out)
    outs = []
    for _ in range(2):
        for t in (new_k, new_v, q):
            t.copy_(torch.randn(t.shape, device="cuda", generator=g))
        graph.replay()
        eager = torch.empty_like(out)
        step(eager_pools, q, new_k, new_v, eager)
        torch.cuda.synchronize()
        assert torch.equal(out, eager), f"{fmt}: replay differs from eager by {(out - eager).abs().max().item()}"
        assert all(torch.equal(a, b) for a, b in zip(graph_pools, eager_pools) if a is not None)
        outs.append(out.clone())
    assert not torch.equal(outs[0], outs[1])  # the replays computed from their new inputs
