"""Send-time conversion (``sglang_ext.transfer.transcode``) in-process, with real SGLang pools on CPU.

Reference: a decode-format pool written directly with the same K/V. The rows the converter
lands in a decode pool must equal, byte for byte, the rows that pool format holds for the same
bf16 K/V (the wire then carries exactly what a prefill of the decode's format would send).
The "transfer" memmoves each block, as Mooncake would between registered buffers.
"""
import ctypes

import numpy as np
import pytest
import torch

from sglang_memha.kvformat import TOKEN_LOCAL_FORMATS, FormatDescriptor, KVFormat

pytest.importorskip("sglang.srt.mem_cache.memory_pool")
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402

from sglang_memha.sglang_ext.transfer import repage, transcode  # noqa: E402
from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool  # noqa: E402
from tests.quant.test_quant_pool import _Layer  # noqa: E402

H, D, L, PAGE, SIZE = 2, 64, 3, 16, 256


def desc(fmt, k_transform="none", page=PAGE):
    return FormatDescriptor(fmt=fmt, page_size=page, num_kv_heads=H, head_dim=D, num_layers=L,
                            model_id="test#0", k_transform=k_transform)


def quant_pool(fmt, k_transform="none", page=PAGE):
    return MemhaQuantKVPool.configured(fmt, k_transform, "test#0")(
        SIZE, page_size=page, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L,
        device="cpu", enable_memory_saver=False)


def stock_pool():
    return MHATokenToKVPool(SIZE, page_size=PAGE, dtype=torch.bfloat16, head_num=H, head_dim=D,
                            layer_num=L, device="cpu", enable_memory_saver=False)


class FakeEngine:
    def __init__(self):
        self.registered, self.deregistered = [], []

    def batch_register(self, ptrs, lens):
        self.registered += list(zip(ptrs, lens))

    def batch_deregister(self, ptrs):
        self.deregistered += list(ptrs)


def memmove_transfer(calls):
    def transfer(session, blocks):
        calls.append((session, len(blocks)))
        for src, dst, n in blocks:
            ctypes.memmove(dst, src, n)
        return 0
    return transfer


def write_same_kv(pools, pages, seed=3):
    """The same bf16 K/V (heavy-ish tails) into ``pages`` of every pool, every layer."""
    g = torch.Generator().manual_seed(seed)
    loc = (torch.as_tensor(pages)[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    for layer in range(L):
        k = (torch.randn(len(loc), H, D, generator=g) * 4).to(torch.bfloat16)
        v = (torch.randn(len(loc), H, D, generator=g)).to(torch.bfloat16)
        k[::7, :, 5] = 80.0  # an outlier channel
        for p in pools:
            p.set_kv_buffer(_Layer(layer), loc, k.clone(), v.clone())


def send(src_pool, src_desc, dst_pool, dst_desc, src_pages, dst_pages, calls=None, n_tokens=None):
    """``dst_pages``: the decode pages of the chunk (equal page sizes) or of the whole request
    from position 0 (re-paged, the chunk's pages being positions 0..n-1)."""
    engine = FakeEngine()
    conv = transcode.Converter(engine, src_pool, src_desc)
    tokens = repage.token_map(src_pages, np.arange(len(src_pages)), dst_pages, src_desc.page_size,
                              dst_desc.page_size, n_tokens)
    ptrs, _, item_lens = dst_pool.get_contiguous_buf_infos()
    ret = conv.send(memmove_transfer(calls if calls is not None else []), "sess", np.array(src_pages),
                    dst_desc, ptrs, repage.runs(tokens.staged_rows, tokens.dst_slots), item_lens[0])
    conv.close()
    assert engine.registered and [p for p, _ in engine.registered] == engine.deregistered
    return ret


def rows(pool, pages):
    """Every published buffer's rows of ``pages`` (code rows, then scale rows where the format has them)."""
    loc = (torch.as_tensor(pages)[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    scales = getattr(pool, "k_scale_buffer", None) or []
    return [b[loc] for b in (*pool.k_buffer, *pool.v_buffer, *scales, *(pool.v_scale_buffer if scales else []))]


SRC_PAGES, DST_PAGES = [1, 2, 3, 7, 9], [4, 5, 11, 12, 2]  # runs broken on both sides


@pytest.mark.parametrize("k_transform", ["none", "hadamard"])
@pytest.mark.parametrize("fmt", [f for f in TOKEN_LOCAL_FORMATS if f != KVFormat.BF16])  # int4_kivi: refused
def test_stock_bf16_pool_encoded_into_decode_format_byte_exact(fmt, k_transform):
    src, ref, dst = stock_pool(), quant_pool(fmt, k_transform), quant_pool(fmt, k_transform)
    write_same_kv([src, ref], SRC_PAGES)
    assert send(src, desc("bf16"), dst, desc(fmt, k_transform), SRC_PAGES, DST_PAGES) == 0
    for got, want in zip(rows(dst, DST_PAGES), rows(ref, SRC_PAGES)):
        assert torch.equal(got, want)
    # pages not addressed stay untouched (zeros)
    untouched = [p for p in range(SIZE // PAGE) if p not in DST_PAGES]
    assert all(int(r.sum()) == 0 for r in rows(dst, untouched))


def test_memha_bf16_pool_is_a_valid_source_too():
    src, ref, dst = quant_pool("bf16"), quant_pool("int8"), quant_pool("int8")
    write_same_kv([src, ref], SRC_PAGES)
    assert send(src, desc("bf16"), dst, desc("int8"), SRC_PAGES, DST_PAGES) == 0
    for got, want in zip(rows(dst, DST_PAGES), rows(ref, SRC_PAGES)):
        assert torch.equal(got, want)


REQUANTIZED = [("fp8_e4m3fnuz", "int8"), ("fp8_e4m3fnuz", "int4_g64"), ("fp8_e4m3", "int4_g32"),
               ("int8", "fp8_e4m3"), ("int4_g64", "bf16"), ("bfp8", "int8"), ("fp8_e4m3_tensor", "int8"),
               ("int8", "fp8_e4m3_tensor")]


def stored_values(pool, fmt, layer, is_key, pages):
    """fp32 values of the rows ``pool`` stores for ``pages`` (K as stored: rotated for a Hadamard
    pool), dequantized by ``fmt``'s codec alone (the reference; not the converter's code)."""
    from sglang_memha.kvformat import get_codec

    loc = (torch.as_tensor(pages)[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    codec = get_codec(fmt)
    data = (pool.k_buffer if is_key else pool.v_buffer)[layer][loc]
    raw = pool.scale_rows(is_key, layer)
    scales = torch.tensor(float(pool.layer_scale)) if raw is None else codec.scales_from_bytes(raw[loc])
    return codec.dequantize(data, scales, torch.float32)


@pytest.mark.parametrize("k_transforms", [("none", "none"), ("none", "hadamard"), ("hadamard", "hadamard")])
@pytest.mark.parametrize("src_fmt, dst_fmt", REQUANTIZED)
def test_quantized_pool_requantized_into_decode_format_byte_exact(src_fmt, dst_fmt, k_transforms):
    """A prefill pool in another quantized format (an AMD-style fnuz pool feeding an int8 or int4
    decode, ...): the decode's rows equal, byte for byte, those of a pool of the decode's format
    fed the prefill's dequantized rows (fp32). A K already rotated by the prefill is not rotated
    again (its reference pool has no transform); an unrotated one is rotated for the decode."""
    src_t, dst_t = k_transforms
    src, dst = quant_pool(src_fmt, src_t), quant_pool(dst_fmt, dst_t)
    ref = quant_pool(dst_fmt, dst_t if src_t == "none" else "none")
    write_same_kv([src], SRC_PAGES)
    loc = (torch.as_tensor(SRC_PAGES)[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    for layer in range(L):
        ref.set_kv_buffer(_Layer(layer), loc, stored_values(src, src_fmt, layer, True, SRC_PAGES),
                          stored_values(src, src_fmt, layer, False, SRC_PAGES))
    assert send(src, desc(src_fmt, src_t), dst, desc(dst_fmt, dst_t), SRC_PAGES, DST_PAGES) == 0
    got, want = rows(dst, DST_PAGES), rows(ref, SRC_PAGES)
    assert len(got) == len(want) == (4 if dst.k_scale_buffer is not None else 2) * L
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    untouched = [p for p in range(SIZE // PAGE) if p not in DST_PAGES]
    assert all(int(r.sum()) == 0 for r in rows(dst, untouched))


def test_requantized_rows_round_twice_within_both_formats_error():
    """fnuz -> int8: each value read on the decode is within the fnuz pool's error of the model's
    value plus int8's error of the fnuz value (half an int8 step of its row, fp32 slack)."""
    src, dst = quant_pool("fp8_e4m3fnuz"), quant_pool("int8")
    g = torch.Generator().manual_seed(5)
    loc = (torch.as_tensor(SRC_PAGES)[:, None] * PAGE + torch.arange(PAGE)).reshape(-1)
    v = (torch.randn(len(loc), H, D, generator=g) * 3).to(torch.bfloat16)
    src.set_kv_buffer(_Layer(0), loc, v.clone(), v.clone())
    assert send(src, desc("fp8_e4m3fnuz"), dst, desc("int8"), SRC_PAGES, DST_PAGES) == 0
    fnuz = stored_values(src, "fp8_e4m3fnuz", 0, False, SRC_PAGES)
    got = stored_values(dst, "int8", 0, False, DST_PAGES)
    step = fnuz.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((got - fnuz).abs() <= step / 2 + fnuz.abs() * 2 ** -22).all())
    assert 0 < float((got - v.float()).abs().max()) <= float(((fnuz - v.float()).abs() + step / 2).max()) + 1e-6


def test_layer_scale_pool_gets_per_row_scales_bytes_kept():
    """fp8_e4m3_tensor (SGLang's fp8 bytes, layer scale 1.0) -> fp8_e4m3: data bytes equal, each
    row's bf16 scale is 1.0, so the decode reads the same values."""
    src, dst = quant_pool("fp8_e4m3_tensor"), quant_pool("fp8_e4m3")
    write_same_kv([src], SRC_PAGES)
    assert send(src, desc("fp8_e4m3_tensor"), dst, desc("fp8_e4m3"), SRC_PAGES, DST_PAGES) == 0
    got = rows(dst, DST_PAGES)
    for data, want in zip(got[:2 * L], rows(src, SRC_PAGES)):
        assert torch.equal(data, want)
    for scales in got[2 * L:]:
        assert torch.equal(scales.contiguous().view(torch.bfloat16), torch.ones(scales.shape[0], H, 1, dtype=torch.bfloat16))
    for layer in range(L):
        a = dst.get_key_buffer(layer)[torch.arange(DST_PAGES[0] * PAGE, (DST_PAGES[0] + 1) * PAGE)]
        b = src.get_key_buffer(layer)[torch.arange(SRC_PAGES[0] * PAGE, (SRC_PAGES[0] + 1) * PAGE)]
        assert torch.equal(a, b)


def test_small_arena_sends_in_rounds_same_bytes(monkeypatch):
    """An arena smaller than a chunk's 2L buffers: several transfer calls, same result."""
    monkeypatch.setattr(transcode, "ARENA_MIN_BYTES", 1)
    src, ref, dst = stock_pool(), quant_pool("fp8_e4m3"), quant_pool("fp8_e4m3")
    write_same_kv([src, ref], SRC_PAGES)
    calls = []
    assert send(src, desc("bf16"), dst, desc("fp8_e4m3"), SRC_PAGES, DST_PAGES, calls) == 0
    assert len(calls) == 2 * L  # one buffer per round
    # dst runs: [4,5], [11,12], [2] -> 3 blocks per buffer, for its code rows and its scale rows
    assert all(n == 6 for _, n in calls)
    for got, want in zip(rows(dst, DST_PAGES), rows(ref, SRC_PAGES)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dst_page, dst_pages", [(32, [3, 1, 6]), (8, [9, 10, 2, 3, 4, 20, 21, 22, 23, 30])])
def test_encoded_and_re_paged_in_one_send(dst_page, dst_pages):
    """bf16 pages of 16 tokens -> fp8 rows in a decode with pages of 32 (or 8) tokens: each of the
    chunk's 75 real tokens lands, byte-exact, in its slot of the decode's pages; nothing else is
    written (the last page's unwritten tail included)."""
    src, ref = stock_pool(), quant_pool("fp8_e4m3")
    dst = quant_pool("fp8_e4m3", page=dst_page)
    write_same_kv([src, ref], SRC_PAGES)
    n_tokens = 75  # 5 pages of 16, the last one holding 11 real tokens
    assert send(src, desc("bf16"), dst, desc("fp8_e4m3", page=dst_page), SRC_PAGES, dst_pages,
                n_tokens=n_tokens) == 0
    t = torch.arange(n_tokens)
    src_slots = torch.as_tensor(SRC_PAGES)[t // PAGE] * PAGE + t % PAGE
    dst_slots = torch.as_tensor(dst_pages)[t // dst_page] * dst_page + t % dst_page
    written = torch.zeros(SIZE + dst_page, dtype=torch.bool)
    written[dst_slots] = True
    for got, want in zip(dst.get_contiguous_buf_infos()[0], ref.get_contiguous_buf_infos()[0]):
        got, want = _tensor_at(dst, got), _tensor_at(ref, want)
        assert torch.equal(got[dst_slots], want[src_slots])
        assert int(got[~written[:got.shape[0]]].sum()) == 0


def test_transfer_failure_status_is_returned():
    src, dst = stock_pool(), quant_pool("fp8_e4m3")
    conv = transcode.Converter(FakeEngine(), src, desc("bf16"))
    ptrs, _, item_lens = dst.get_contiguous_buf_infos()
    ret = conv.send(lambda s, b: -1, "sess", np.array([1]), desc("fp8_e4m3"), ptrs,
                    np.array([[0, 2 * PAGE, PAGE]]), item_lens[0])
    assert ret == -1


def test_wrong_decode_page_bytes_and_unbridgeable_pairs_refused():
    src, dst = stock_pool(), quant_pool("fp8_e4m3")
    conv = transcode.Converter(FakeEngine(), src, desc("bf16"))
    ptrs = dst.get_contiguous_buf_infos()[0]
    with pytest.raises(ValueError, match="decode page of fp8_e4m3 is 100 B"):
        conv.send(memmove_transfer([]), "s", np.array([1]), desc("fp8_e4m3"), ptrs,
                  np.array([[0, 2 * PAGE, PAGE]]), 100)
    with pytest.raises(ValueError, match=r"3 buffers for a fp8_e4m3 pool of 3 layers, expected 12"):
        conv.send(memmove_transfer([]), "s", np.array([1]), desc("fp8_e4m3"), ptrs[:3],
                  np.array([[0, 2 * PAGE, PAGE]]), PAGE * H * D)
    data, scales = torch.empty(4, H, D, dtype=torch.uint8), torch.empty(4, H, 2, dtype=torch.uint8)
    for kivi in ("int4_kivi", "int4_kivi_g64"):
        with pytest.raises(ValueError, match=f"fmt: local='fp8_e4m3' peer='{kivi}'"):  # K blocks, not rows
            transcode.convert_rows(torch.zeros(4, H, D // 2, dtype=torch.uint8), desc(kivi), desc("fp8_e4m3"),
                                   data, scales, True)


def _tensor_at(pool, ptr):
    """The published buffer of ``pool`` whose base address is ``ptr``."""
    return next(t for layer in range(L) for t in pool.layer_buffers(layer) if t.data_ptr() == ptr)


def stock_fp8_pool():
    return MHATokenToKVPool(SIZE, page_size=PAGE, dtype=torch.float8_e4m3fn, head_num=H, head_dim=D,
                            layer_num=L, device="cpu", enable_memory_saver=False)


@pytest.mark.parametrize("scales", [[None] * L, [(0.5, 2.0), (1.0, 0.25), (4.0, 1.0)]])
def test_stock_fp8_pool_bytes_kept_model_scales_per_row(scales):
    """SGLang's own fp8 pool (``--kv-cache-dtype fp8_e4m3``): data bytes go as they are, each row
    gets its layer's model scale (the value the pool divided by; None: the layer has none, 1.0)
    as its bf16 scale."""
    src, dst = stock_fp8_pool(), quant_pool("fp8_e4m3")
    write_same_kv([src], SRC_PAGES)
    src.memha_kv_scales = scales
    assert transcode.scale_problem(src) is None
    assert send(src, desc("fp8_e4m3_tensor"), dst, desc("fp8_e4m3"), SRC_PAGES, DST_PAGES) == 0
    pairs = transcode.layer_scales(src)
    got, want = rows(dst, DST_PAGES), rows(src, SRC_PAGES)  # dst: 2L code buffers, then 2L scale buffers
    for i, w in enumerate(want):
        layer, is_v = i % L, i >= L
        assert torch.equal(got[i], w.view(torch.uint8))
        assert torch.equal(got[2 * L + i].contiguous().view(torch.bfloat16),
                           torch.full((w.shape[0], H, 1), pairs[layer][is_v], dtype=torch.bfloat16))


def test_stock_fp8_scale_that_bf16_cannot_hold_is_refused():
    src = stock_fp8_pool()
    unread = transcode.scale_problem(src)  # model scales never recorded: not guessed as 1.0
    assert unread is not None and "could not be read" in unread
    src.memha_kv_scales = [(1.0, 1.0), (0.3, 1.0), None]
    reason = transcode.scale_problem(src)
    assert reason is not None and "layer 1 K scale 0.3" in reason and "MEMHA_KV_FORMAT=fp8_e4m3" in reason


def test_stock_pools_described_for_memha_decodes(monkeypatch):
    from types import SimpleNamespace

    from sglang_memha.sglang_ext import state
    from sglang_memha.sglang_ext.pool import stock_pool as stock

    monkeypatch.delenv("MEMHA_KV_FORMAT", raising=False)
    monkeypatch.delenv("MEMHA_ENCODE_ON_SEND", raising=False)
    hf = SimpleNamespace(architectures=["X"], num_hidden_layers=L)
    kvc = SimpleNamespace(server_args=SimpleNamespace(disaggregation_mode="prefill"),
                          model_config=SimpleNamespace(hf_config=hf, model_path="/m/tiny"))
    saved = (state.local_descriptor(), state.local_pool(), state.local_is_stock())
    try:
        for pool, fmt in ((stock_pool(), "bf16"), (stock_fp8_pool(), "fp8_e4m3_tensor")):
            state.set_local_descriptor(None)
            assert stock.describe_stock_pool(pool, kvc) is pool
            d = state.local_descriptor()
            assert (d.fmt.value, d.page_size, d.num_kv_heads, d.head_dim, d.num_layers) == (fmt, PAGE, H, D, L)
            assert state.local_is_stock() and state.local_pool() is pool and d.model_id.startswith("tiny#")
        state.set_local_descriptor(None)
        fp16 = MHATokenToKVPool(SIZE, page_size=PAGE, dtype=torch.float16, head_num=H, head_dim=D,
                                layer_num=L, device="cpu", enable_memory_saver=False)
        stock.describe_stock_pool(fp16, kvc)  # not convertible: stays undescribed
        assert state.local_descriptor() is None
        decode = SimpleNamespace(server_args=SimpleNamespace(disaggregation_mode="decode"), model_config=None)
        stock.describe_stock_pool(stock_pool(), decode)  # only prefills are described
        assert state.local_descriptor() is None
        monkeypatch.setenv("MEMHA_ENCODE_ON_SEND", "0")
        stock.describe_stock_pool(stock_pool(), kvc)
        assert state.local_descriptor() is None
    finally:
        state.set_local_descriptor(saved[0], pool=saved[1], stock=saved[2])


def test_attention_scales_read_from_radix_attention_like_modules():
    from sglang_memha.sglang_ext.pool.stock_pool import attention_scales

    class Attn(torch.nn.Module):
        def __init__(self, layer_id, k, v):
            super().__init__()
            self.layer_id, self.k_scale_float, self.v_scale_float = layer_id, k, v

    model = torch.nn.Sequential(Attn(0, None, None), torch.nn.Linear(2, 2), Attn(1, 0.5, 2.0))
    assert attention_scales(model) == {0: (1.0, 1.0), 1: (0.5, 2.0)}
