"""An int4_kivi (and int4_kivi_g64) pool in-process (SGLang's real MHATokenToKVPool base, CPU, no server).

Reference: KIVI with a bf16 residual. After each forward, K read at position p is the bf16 value
written there if p's 32-token block is still open, else the codec's round trip of the whole
block (``Int4KiviKCodec.quantize`` of the exact values); V is int4_g32's (int4_g64's) round trip. And the
pool rows are at every moment what the codec makes of the written rows (``quantize_blocks``),
so any page can be sent as is.
"""
import logging

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.transforms import rotate, unrotate

pytest.importorskip("sglang.srt.mem_cache.memory_pool")
from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool  # noqa: E402

H, D, L, PAGE, B = 2, 64, 2, 32, 32
K = get_codec("int4_kivi", role="k")  # int4_kivi_g64's K too
FMTS = ["int4_kivi", "int4_kivi_g64"]  # V: int4_g32, int4_g64


class _Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


def make_pool(k_transform="none", size=40 * PAGE, fmt="int4_kivi"):
    cls = MemhaQuantKVPool.configured(fmt, k_transform, "test#0")
    return cls(size, page_size=PAGE, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L,
               device="cpu", enable_memory_saver=False)


class Seq:
    """One request's K/V history at slots ``base + position`` (``base`` page-aligned)."""

    def __init__(self, base: int, seed: int):
        self.base, self.g = base, torch.Generator().manual_seed(seed)
        self.k = torch.empty(0, H, D, dtype=torch.bfloat16)
        self.v = torch.empty(0, H, D, dtype=torch.bfloat16)

    def new(self, n: int):
        """n new tokens -> (slots, k, v); K has a per-channel offset (what KIVI is for)."""
        k = (torch.randn(n, H, D, generator=self.g) + torch.linspace(-8, 8, D)).to(torch.bfloat16)
        v = torch.randn(n, H, D, generator=self.g).to(torch.bfloat16)
        slots = self.base + len(self.k) + torch.arange(n)
        self.k, self.v = torch.cat([self.k, k]), torch.cat([self.v, v])
        return slots, k, v

    @property
    def slots(self):
        return self.base + torch.arange(len(self.k))

    def want_k(self, k_transform="none"):
        x = rotate(self.k.float()) if k_transform != "none" else self.k.float()
        n = len(x) - len(x) % B
        out = x.clone()
        if n:
            out[:n] = K.dequantize(*K.quantize(x[:n]), torch.float32)
        if k_transform != "none":
            return unrotate(out).to(torch.bfloat16)
        return out.to(torch.bfloat16)

    def want_v(self, fmt="int4_kivi"):
        v = get_codec(fmt, role="v")
        return v.dequantize(*v.quantize(self.v), torch.bfloat16)


def forward(pool, writes):
    """One forward: every layer writes ``writes`` = [(slots, k, v), ...] as one batch (slots of
    several requests interleaved, as SGLang's out_cache_loc)."""
    loc = torch.cat([w[0] for w in writes])
    k = torch.cat([w[1] for w in writes]).reshape(len(loc), H * D)
    v = torch.cat([w[2] for w in writes]).reshape(len(loc), H * D)
    for layer in range(L):
        pool.set_kv_buffer(_Layer(layer), loc, k, v)


def check(pool, seq, k_transform="none"):
    for layer in range(L):
        got_k = pool.get_key_buffer(layer)[seq.slots]
        assert torch.equal(got_k.view(torch.int16), seq.want_k(k_transform).view(torch.int16)), f"layer {layer} K"
        got_v = pool.get_value_buffer(layer)[seq.slots]
        want_v = seq.want_v(pool.memha_format)
        assert torch.equal(got_v.view(torch.int16), want_v.view(torch.int16)), f"layer {layer} V"


def check_rows_are_the_codecs(pool, seq, k_transform="none", layer=0):
    """The open block's pool rows = quantize_blocks of its exact (rotated) values with its fill."""
    n = len(seq.k)
    if n % B == 0:
        return
    lo = n - n % B
    block = torch.zeros(1, B, H, D)
    block[0, : n - lo] = rotate(seq.k[lo:].float()) if k_transform != "none" else seq.k[lo:].float()
    data, scales = K.quantize_blocks(block, torch.tensor([n - lo]))
    at = slice(seq.base + lo, seq.base + lo + B)
    assert torch.equal(pool.k_buffer[layer][at], data)
    assert torch.equal(pool.k_scale_buffer[layer][at], K.scale_bytes(scales))


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("k_transform", ["none", "hadamard"])
def test_chunked_prefill_then_decode_reads_kivi_with_residual(k_transform, fmt):
    pool = make_pool(k_transform, fmt=fmt)
    seq = Seq(base=2 * PAGE, seed=1)
    for n in (20, 25, 40):  # chunks: open block continued, a block completed, whole blocks
        forward(pool, [seq.new(n)])
        check(pool, seq, k_transform)
        check_rows_are_the_codecs(pool, seq, k_transform)
    for _ in range(40):  # decode, one token per step, across a block boundary
        forward(pool, [seq.new(1)])
        check(pool, seq, k_transform)
    check_rows_are_the_codecs(pool, seq, k_transform)


@pytest.mark.parametrize("fmt", FMTS)
def test_a_batch_of_requests_written_in_any_order(fmt):
    pool = make_pool(fmt=fmt)
    seqs = [Seq(base=(2 + 4 * i) * PAGE, seed=10 + i) for i in range(5)]  # 4 pages each
    forward(pool, [s.new(n) for s, n in zip(seqs, (3, 32, 50, 64, 1))])
    for step in range(35):
        writes = [s.new(1) for s in seqs]
        forward(pool, writes[::-1] if step % 2 else writes)
    for s in seqs:
        check(pool, s)


@pytest.mark.parametrize("fmt", FMTS)
def test_rows_landed_by_a_transfer_are_continued_from_their_codes(fmt):
    """Decode side: the prefill's rows arrive as bytes (Mooncake), then the decode appends. The
    open block's earlier rows come back through their codes (rounded once more), never from a
    shadow some earlier owner of the block left behind."""
    prefill, decode = make_pool(fmt=fmt), make_pool(fmt=fmt)
    seq = Seq(base=4 * PAGE, seed=3)
    forward(prefill, [seq.new(45)])
    stale = Seq(base=4 * PAGE, seed=99)  # an earlier request on the decode's same pages, same fill
    forward(decode, [stale.new(45)])
    pages = torch.arange(seq.base, seq.base + 2 * PAGE)
    for layer in range(L):  # the transfer: raw rows of the request's pages (Mooncake moves pages)
        for dst, src in zip(decode.layer_buffers(layer), prefill.layer_buffers(layer)):
            dst[pages] = src[pages]
    landed = [decode.get_key_buffer(layer)[seq.slots] for layer in range(L)]
    for layer in range(L):  # the complete block reads the same on both sides
        assert torch.equal(landed[layer][:32], prefill.get_key_buffer(layer)[seq.slots][:32])
    slots, k, v = seq.new(1)
    forward(decode, [(slots, k, v)])
    for layer in range(L):
        got = decode.get_key_buffer(layer)[seq.slots]
        at = slice(seq.base + 32, seq.base + 64)
        restored = K.dequantize(prefill.k_buffer[layer][at], K.scales_from_bytes(prefill.k_scale_buffer[layer][at]),
                                torch.bfloat16)[:13]
        assert torch.equal(got[32:45], restored)
        assert not torch.equal(got[32:45], stale.k[32:45])
        assert torch.equal(got[45], k[0])


@pytest.mark.parametrize("fmt", FMTS)
def test_cpu_copy_round_trip_then_continue(fmt):
    """Retraction: rows copied out and back (another pool: no shadow), then decoding goes on."""
    a, b = make_pool(fmt=fmt), make_pool(fmt=fmt)
    seq = Seq(base=PAGE, seed=5)
    forward(a, [seq.new(50)])
    b.load_cpu_copy(a.get_cpu_copy(seq.slots), seq.slots)
    for layer in range(L):  # whole blocks copied: the open block's later rows hold its table
        assert torch.equal(b.k_buffer[layer], a.k_buffer[layer])
        assert torch.equal(b.k_scale_buffer[layer], a.k_scale_buffer[layer])
        assert torch.equal(b.v_scale_buffer[layer], a.v_scale_buffer[layer])
    forward(b, [seq.new(1)])
    got = b.get_key_buffer(0)[seq.slots]
    assert torch.equal(got[:32], seq.want_k()[:32]) and torch.equal(got[50], seq.k[50])


def test_kivi_g64_pool_stores_int4_g64_v_rows_beside_int4_kivi_k_rows():
    """int4_kivi_g64: K rows as an int4_kivi pool's (D/2 + D/8 B), V rows int4_g64's bytes
    (D/2 + D/16 B): 76 B per (token, head) at D = 64, the pool's bytes per token and its
    published page bytes."""
    from sglang_memha.kvformat import kv_bytes_per_token

    g64, kivi = make_pool(fmt="int4_kivi_g64"), make_pool()
    assert [b[0].shape[-1] for b in (g64.k_buffer, g64.k_scale_buffer, g64.v_buffer, g64.v_scale_buffer)] == \
        [D // 2, D // 8, D // 2, D // 16]
    assert g64.bytes_per_token() == L * H * 76 == L * kv_bytes_per_token("int4_kivi_g64", H, D)
    assert kivi.bytes_per_token() == L * H * 80
    _, _, item_lens = g64.get_contiguous_buf_infos()
    assert item_lens == [PAGE * H * n for n in (D // 2, D // 8, D // 2, D // 16) for _ in range(L)]
    seq = Seq(base=2 * PAGE, seed=7)
    writes = [seq.new(45)]
    forward(g64, writes)
    forward(kivi, writes)
    v = get_codec("int4_g64")
    data, scales = v.quantize(seq.v)
    for layer in range(L):
        assert torch.equal(g64.k_buffer[layer], kivi.k_buffer[layer])
        assert torch.equal(g64.k_scale_buffer[layer], kivi.k_scale_buffer[layer])
        assert torch.equal(g64.v_buffer[layer][seq.slots], data)
        assert torch.equal(g64.v_scale_buffer[layer][seq.slots], v.scale_bytes(scales))
    check(g64, seq)


def test_more_open_blocks_than_shadows_grows_the_table(caplog):
    pool = make_pool(size=80 * PAGE)
    seqs = [Seq(base=(1 + i) * PAGE, seed=i) for i in range(40)]
    with caplog.at_level(logging.WARNING, logger="sglang_memha"):
        forward(pool, [s.new(5) for s in seqs])
    assert "40 K blocks open at once" in caplog.text and pool.open_blocks.capacity >= 40
    forward(pool, [s.new(1) for s in seqs])
    for s in seqs:
        check(pool, s)


def test_shadows_are_reused_least_recent_first():
    pool = make_pool(size=80 * PAGE)
    cap = pool.open_blocks.capacity
    old = [Seq(base=(1 + i) * PAGE, seed=i) for i in range(cap)]
    forward(pool, [s.new(3) for s in old])
    new = [Seq(base=(1 + cap + i) * PAGE, seed=100 + i) for i in range(cap // 2)]
    forward(pool, [s.new(3) for s in new])  # takes the old ones' shadows
    assert pool.open_blocks.capacity == cap
    forward(pool, [s.new(1) for s in old + new])  # old ones restore from their rows
    for s in new:
        check(pool, s)
    got = pool.get_key_buffer(0)[old[0].slots]
    assert torch.equal(got[3], old[0].k[3])  # the newest row exact; rows 0..2 through their codes


@pytest.mark.parametrize("fmt", FMTS)
def test_refusals(fmt):
    pool = make_pool(fmt=fmt)
    x = torch.zeros(2, H * D).bfloat16()
    pool.set_kv_buffer(_Layer(0), torch.tensor([64, 65]), x, x)
    with pytest.raises(ValueError, match="do not fill their 32-token K blocks in position order"):
        pool.set_kv_buffer(_Layer(0), torch.tensor([70, 72]), x, x)
    cls = MemhaQuantKVPool.configured(fmt, "none", "test#0")
    with pytest.raises(ValueError, match=f"MEMHA_KV_FORMAT={fmt} codes K per 32-token block, so --page-size "
                                         f"must be a multiple of 32 \\(got 16\\)"):
        cls(256, page_size=16, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L, device="cpu",
            enable_memory_saver=False)


@pytest.mark.parametrize("fmt", FMTS)
def test_eager_pool_lands_kivi_blocks_through_their_codes(fmt):
    """MEMHA_DECODE_DEQUANT=eager with int4_kivi(_g64): arrived pages decode through their blocks'
    tables, the open block too (its rows as the prefill coded them)."""
    from sglang_memha.sglang_ext.pool.eager_pool import MemhaEagerKVPool

    prefill = make_pool(fmt=fmt)
    cls = MemhaEagerKVPool.configured(fmt, "none", "test#0")
    eager = cls(40 * PAGE, page_size=PAGE, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L,
                device="cpu", enable_memory_saver=False)
    seq = Seq(base=3 * PAGE, seed=8)
    forward(prefill, [seq.new(45)])
    forward(eager, [Seq(base=3 * PAGE, seed=9).new(45)])  # an earlier owner's shadows, on the same blocks
    pages = torch.arange(seq.base, seq.base + 2 * PAGE)
    for layer in range(L):
        for dst, src in zip(eager.layer_buffers(layer), prefill.layer_buffers(layer)):
            dst[pages] = src[pages]
    eager.land(seq.slots)
    for layer in range(L):
        want = K.dequantize(prefill.k_buffer[layer][pages], K.scales_from_bytes(prefill.k_scale_buffer[layer][pages]),
                            torch.bfloat16)[:45]
        assert torch.equal(eager.get_key_buffer(layer)[seq.slots], want)
        assert torch.equal(eager.get_value_buffer(layer)[seq.slots], seq.want_v(fmt))


def test_k_offset_pool_stores_k_minus_c_in_blocks(tmp_path):
    """MEMHA_K_OFFSET on int4_kivi: rows and open-block residuals are those of a pool fed K - c;
    reads add c back (fp32) before the one cast."""
    from sglang_memha.kvformat import k_offset

    c = torch.randn(L, H, D, generator=torch.Generator().manual_seed(4)) * 3
    path = str(tmp_path / "k.safetensors")
    off = k_offset.save(path, c, "test#0", {})
    pool = MemhaQuantKVPool.configured("int4_kivi", "none", "test#0", path)(
        40 * PAGE, page_size=PAGE, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L,
        device="cpu", enable_memory_saver=False)
    plain = make_pool()
    seq = Seq(PAGE, seed=11)
    for n in (40, 1, 1):  # a whole block, an open one, decode steps into it
        slots, k, v = seq.new(n)
        pool.set_kv_buffer(_Layer(1), slots, k.view(n, H * D), v.view(n, H * D))
        stored = (k.float() - off.values[1]).to(torch.bfloat16)
        plain.set_kv_buffer(_Layer(1), slots, stored.view(n, H * D), v.view(n, H * D))
    assert torch.equal(pool.k_buffer[1][seq.slots], plain.k_buffer[1][seq.slots])
    assert torch.equal(pool.k_scale_buffer[1][seq.slots], plain.k_scale_buffer[1][seq.slots])
    want = (plain.open_blocks.read(1, seq.slots, plain.k_buffer[1], plain.k_scale_buffer[1], torch.float32, True)
            + off.values[1])
    assert torch.equal(pool.get_key_buffer(1)[seq.slots], want.to(torch.bfloat16))
