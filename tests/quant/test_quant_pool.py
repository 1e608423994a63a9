"""MemhaQuantKVPool in-process (SGLang's real MHATokenToKVPool base, CPU, no server).

Reference: the codec itself. What the pool returns for a slot must equal, bit for bit,
``codec.dequantize(codec.quantize(x))`` of what was written there (through the Hadamard K
rotation when it is on): the pool adds layout, not arithmetic.
"""
import pytest
import torch

from sglang_memha.kvformat import (
    TOKEN_LOCAL_FORMATS, KVFormat, format_spec, get_codec, kv_bytes_per_token, page_geometry)
from sglang_memha.kvformat.layout import PoolLayout
from sglang_memha.kvformat.transforms import rotate, unrotate

pytest.importorskip("sglang.srt.mem_cache.memory_pool")
from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool, QuantKVView  # noqa: E402

H, D, L, PAGE = 2, 64, 3, 16


class _Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


def make_pool(fmt, k_transform="none", size=128, page=PAGE):
    cls = MemhaQuantKVPool.configured(fmt, k_transform, "test#0")
    return cls(size, page_size=page, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L,
               device="cpu", enable_memory_saver=False)


def reference(fmt, x, is_key, k_transform):
    codec = get_codec(fmt)
    if is_key and k_transform != "none":
        x = rotate(x)
    if fmt == KVFormat.FP8_E4M3_TENSOR:
        data, scales = codec.quantize(x, 1.0)
    else:
        data, scales = codec.quantize(x)
    if is_key and k_transform != "none":
        return unrotate(codec.dequantize(data, scales, torch.float32)).to(torch.bfloat16)
    return codec.dequantize(data, scales, torch.bfloat16)


@pytest.mark.parametrize("k_transform", ["none", "hadamard"])
@pytest.mark.parametrize("fmt", TOKEN_LOCAL_FORMATS)  # int4_kivi(_g64): test_kivi_pool.py
def test_write_then_gather_equals_codec_round_trip(fmt, k_transform):
    pool = make_pool(fmt, k_transform)
    g = torch.Generator().manual_seed(7)
    loc = torch.tensor([16, 17, 18, 40, 41, 100], dtype=torch.int64)
    k = (torch.randn(len(loc), H * D, generator=g) * 3).to(torch.bfloat16)
    v = (torch.randn(len(loc), H * D, generator=g) * 3).to(torch.bfloat16)
    pool.set_kv_buffer(_Layer(1), loc, k, v)
    order = torch.tensor([5, 0, 3, 1, 4, 2])  # gathered in another order, as attention does
    got_k = pool.get_key_buffer(1)[loc[order]]
    got_v = pool.get_value_buffer(1)[loc[order]]
    want_k = reference(fmt, k.view(-1, H, D), True, k_transform)[order]
    want_v = reference(fmt, v.view(-1, H, D), False, "none")[order]
    assert got_k.dtype == torch.bfloat16 and got_k.shape == (len(loc), H, D)
    assert torch.equal(got_k.view(torch.int16), want_k.view(torch.int16))
    assert torch.equal(got_v.view(torch.int16), want_v.view(torch.int16))
    # Other layers untouched (all-zero rows decode to zeros).
    assert not pool.k_buffer[0].any() and not pool.k_buffer[2].any()


@pytest.mark.parametrize("fmt", list(KVFormat))
def test_transfer_geometry_is_the_formats(fmt):
    page = PAGE if format_spec(fmt).token_local else 32  # int4_kivi(_g64): whole 32-token K blocks
    pool = make_pool(fmt, page=page)
    geo = page_geometry(fmt, page, H, D)
    ptrs, lens, item_lens = pool.get_contiguous_buf_infos()
    # format v4: [K data, K scale, V data, V scale] per layer range (no scale entries without scale rows)
    scales = geo.scale_bytes > 0
    want = [*pool.k_buffer, *(pool.k_scale_buffer if scales else ()),
            *pool.v_buffer, *(pool.v_scale_buffer if scales else ())]
    assert ptrs == [t.data_ptr() for t in want] and len(ptrs) == (4 if scales else 2) * L
    k_side = [geo.data_bytes] * L + ([geo.scale_bytes] * L if scales else [])
    v_side = [geo.data_bytes] * L + ([geo.v_scale_bytes] * L if scales else [])  # int4_kivi_g64: V's differ
    assert item_lens == k_side + v_side == PoolLayout(fmt, D, H, L, page).item_lens()
    assert [t.shape[-1] for t in want] == [n // (page * H) for n in item_lens]
    assert lens == [n // page * (pool.size + page) for n in item_lens]
    assert all(p % 16 == 0 for p in ptrs)  # data rows of D = 64 start on 16-byte boundaries
    assert pool.bytes_per_token() == L * kv_bytes_per_token(fmt, H, D)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes + v_bytes == (pool.size + page) * pool.bytes_per_token()


def test_cpu_copy_round_trip_carries_scales():
    """Decode retraction on CPU (``cpu_tensor`` backup) copies rows out and back."""
    a, b = make_pool("int4_g64"), make_pool("int4_g64")
    loc = torch.arange(32, 48)
    for layer in range(L):
        a.set_kv_buffer(_Layer(layer), loc, torch.randn(16, H * D).bfloat16(), torch.randn(16, H * D).bfloat16())
    b.load_cpu_copy(a.get_cpu_copy(loc), loc)
    for layer in range(L):
        assert torch.equal(a.get_key_buffer(layer)[loc], b.get_key_buffer(layer)[loc])
        assert torch.equal(a.get_value_buffer(layer)[loc], b.get_value_buffer(layer)[loc])


def test_view_refuses_other_access():
    view = make_pool("fp8_e4m3").get_key_buffer(0)
    assert isinstance(view, QuantKVView)
    with pytest.raises(TypeError, match="torch_native"):
        view.data_ptr()


def test_unsupported_write_args_are_refused():
    pool = make_pool("int8")
    x = torch.zeros(1, H * D).bfloat16()
    with pytest.raises(NotImplementedError, match="k_scale"):
        pool.set_kv_buffer(_Layer(0), torch.tensor([1]), x, x, k_scale=0.5)


@pytest.mark.parametrize("with_offset", [False, True])
def test_eager_pool_lands_arrived_rows_as_bf16(with_offset, tmp_path):
    """Landed rows read as the deferred pool reads them (the K offset added back when set)."""
    from sglang_memha.sglang_ext.pool.eager_pool import MemhaEagerKVPool

    path = _offset_file(tmp_path)[0] if with_offset else None
    pool = _offset_pool("fp8_e4m3", "none", path, MemhaEagerKVPool)
    deferred = _offset_pool("fp8_e4m3", "none", path)
    loc = torch.arange(16, 40)
    k, v = torch.randn(24, H * D).bfloat16(), torch.randn(24, H * D).bfloat16()
    deferred.set_kv_buffer(_Layer(2), loc, k, v)
    # What Mooncake does: the prefill's quantized rows land in the registered buffers.
    for idx in range(L):
        for dst, src in zip(pool.layer_buffers(idx), deferred.layer_buffers(idx)):
            dst[loc] = src[loc]
    pool.land(loc)
    assert torch.equal(pool.get_key_buffer(2)[loc], deferred.get_key_buffer(2)[loc])
    assert torch.equal(pool.get_value_buffer(2)[loc], deferred.get_value_buffer(2)[loc])
    # Tokens generated on decode are stored in bf16, unquantized.
    new = torch.randn(1, H * D).bfloat16()
    pool.set_kv_buffer(_Layer(0), torch.tensor([50]), new, new)
    assert torch.equal(pool.get_key_buffer(0)[torch.tensor([50])], new.view(1, H, D))
    # Memory per token: the landing rows plus bf16 rows (more than stock: an ablation only).
    assert pool.bytes_per_token() == deferred.bytes_per_token() + 2 * L * H * D * 2


def test_fnuz_rows_bridged_in_place_equal_fn_rows():
    """Our fnuz encoder writes fn's codes with exponent + 1, so bridged rows are byte-identical
    to what a fn prefill would have sent."""
    from sglang_memha.kvformat import Bridge

    fn, fnuz = make_pool("fp8_e4m3"), make_pool("fp8_e4m3fnuz")
    loc = torch.arange(16, 48)
    for layer in range(L):
        k, v = torch.randn(32, H * D).bfloat16() * 5, torch.randn(32, H * D).bfloat16()
        fn.set_kv_buffer(_Layer(layer), loc, k, v)
        fnuz.set_kv_buffer(_Layer(layer), loc, k, v)
    fnuz.apply_bridge(loc, Bridge.FNUZ_TO_FN)
    for layer in range(L):
        for a, b in zip(fn.layer_buffers(layer), fnuz.layer_buffers(layer)):
            assert torch.equal(a, b)


def test_bridge_refusal_writes_nothing():
    from sglang_memha.kvformat import Bridge

    pool = make_pool("fp8_e4m3fnuz")
    loc = torch.arange(16, 20)
    pool.set_kv_buffer(_Layer(0), loc, torch.randn(4, H * D).bfloat16(), torch.randn(4, H * D).bfloat16())
    pool.v_buffer[L - 1][loc[0], 0, 0] = 0x80  # fnuz NaN code in the last buffer converted
    before = [b.clone() for b in (*pool.k_buffer, *pool.v_buffer)]
    with pytest.raises(ValueError, match="NaN"):
        pool.apply_bridge(loc, Bridge.FNUZ_TO_FN)
    assert all(torch.equal(a, b) for a, b in zip(before, (*pool.k_buffer, *pool.v_buffer)))


# ---- MEMHA_K_OFFSET (kvformat/k_offset.py) ------------------------------------------------------
def _offset_file(tmp_path, model_id="test#0", layers=L, heads=H, big=40.0):
    """An offset with a large constant on 2 channels per head (what calibration finds in K)."""
    from sglang_memha.kvformat import k_offset

    c = torch.randn(layers, heads, D, generator=torch.Generator().manual_seed(3)) * 0.5
    c[..., 30:32] += big
    path = str(tmp_path / "k_offset.safetensors")
    return path, k_offset.save(path, c, model_id, {"source": "test"})


def _offset_pool(fmt, k_transform, path, cls=MemhaQuantKVPool):
    return cls.configured(fmt, k_transform, "test#0", path)(
        128, page_size=PAGE, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L,
        device="cpu", enable_memory_saver=False)


@pytest.mark.parametrize("k_transform", ["none", "hadamard"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4_g64", "bf16"])
def test_k_offset_rows_hold_k_minus_c_and_reads_add_it_back(fmt, k_transform, tmp_path):
    path, off = _offset_file(tmp_path)
    pool = _offset_pool(fmt, k_transform, path)
    plain = make_pool(fmt, k_transform)
    c = off.values[1]
    assert pool.memha_descriptor.k_offset == off.digest and plain.memha_descriptor.k_offset == "none"
    g = torch.Generator().manual_seed(5)
    loc = torch.tensor([16, 17, 40, 100])
    k = (torch.randn(4, H, D, generator=g) * 3 + c).to(torch.bfloat16)  # K around its offset
    v = (torch.randn(4, H * D, generator=g) * 3).to(torch.bfloat16)
    pool.set_kv_buffer(_Layer(1), loc, k.view(4, H * D), v)
    # rows = what a pool without the offset stores for K - c (fp32 difference, cast back unless rotated)
    stored = k.float() - c
    plain.set_kv_buffer(_Layer(1), loc, stored.to(torch.bfloat16) if k_transform == "none" else stored, v)
    assert torch.equal(pool.k_buffer[1][loc], plain.k_buffer[1][loc])
    assert torch.equal(pool.v_buffer[1][loc], plain.v_buffer[1][loc])
    # read: decode in fp32, un-rotate, + c, one cast to bf16
    x = rotate(stored) if k_transform != "none" else stored.to(torch.bfloat16)
    codec = get_codec(fmt)
    y = codec.dequantize(*codec.quantize(x), torch.float32)
    want = ((unrotate(y) if k_transform != "none" else y) + c).to(torch.bfloat16)
    assert torch.equal(pool.get_key_buffer(1)[loc].view(torch.int16), want.view(torch.int16))
    assert torch.equal(pool.get_value_buffer(1)[loc], plain.get_value_buffer(1)[loc])


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8", "int4_g64"])
def test_k_offset_shrinks_the_error_of_k_with_large_channels(fmt, tmp_path):
    """Why the offset exists: in K rows with 2 large channels, those channels' own error is large
    (fp8: ~3% of 40) and, for integer formats, the per-row scale they set costs every other
    channel precision. Stored minus the offset, both shrink: RMS error over the row < half."""
    path, off = _offset_file(tmp_path)
    g = torch.Generator().manual_seed(9)
    loc = torch.arange(16, 48)
    k = (torch.randn(32, H, D, generator=g) + off.values[0]).to(torch.bfloat16)
    err = {}
    for name, pool in (("plain", make_pool(fmt)), ("offset", _offset_pool(fmt, "none", path))):
        pool.set_kv_buffer(_Layer(0), loc, k.view(32, H * D), k.view(32, H * D))
        diff = pool.get_key_buffer(0)[loc].float() - k.float()
        err[name] = diff.pow(2).mean().sqrt().item()
    assert err["offset"] < 0.5 * err["plain"], err


def test_k_offset_of_another_model_or_shape_is_refused(tmp_path):
    path, _ = _offset_file(tmp_path, model_id="other#1")
    with pytest.raises(ValueError, match=r"calibrated for model 'other#1', this server runs 'test#0'.*sglang_memha.calibrate"):
        _offset_pool("fp8_e4m3", "none", path)
    path, _ = _offset_file(tmp_path, heads=3)
    with pytest.raises(ValueError, match="MEMHA_K_OFFSET has 3 kv heads; this pool holds 2 per rank"):
        _offset_pool("fp8_e4m3", "none", path)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz", "bf16"])
def test_fused_gather_read_equals_gather_then_decode(fmt):
    """The attention read (``view[slots]``) takes the codec's fused gather + dequantize (fp8: one C
    pass on CPU; bf16: one gather); it must give the bytes of gathering the rows and decoding them
    (``read_rows``)."""
    pool = make_pool(fmt)
    loc = torch.arange(16, 80)
    k, v = (torch.randn(64, H * D) * 5).bfloat16(), torch.randn(64, H * D).bfloat16()
    pool.set_kv_buffer(_Layer(1), loc, k, v)
    slots = torch.tensor([79, 16, 40, 40, 17], dtype=torch.int32)  # SGLang's req_to_token is int32
    for view, is_key in ((pool.get_key_buffer(1), True), (pool.get_value_buffer(1), False)):
        data, scales = (pool.k_buffer if is_key else pool.v_buffer)[1], pool.scale_rows(is_key, 1)
        assert pool.codec.gather_rows_fused(data, scales, slots, D, torch.bfloat16) is not None  # the fused path ran
        gathered = (data[slots.long()], None if scales is None else scales[slots.long()])
        assert torch.equal(view[slots].view(torch.int16), pool.read_rows(*gathered, is_key, 1).view(torch.int16))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int4_g64", "bf16", "int4_kivi", "int4_kivi_g64"])
def test_nonfinite_kv_is_zeroed_and_flagged_not_raised(fmt):
    """A NaN / inf / huge K or V element must not raise inside the forward (that would end the
    scheduler): the pool stores 0 there and flags the token's slot for its layer, so the
    prefill's sender fails only that request (``nonfinite_layers``); a later finite write of the
    slot clears the flag."""
    page = PAGE if format_spec(fmt).token_local else 32
    pool, ref = make_pool(fmt, page=page), make_pool(fmt, page=page)
    loc = torch.arange(2 * page, 3 * page)  # page 2
    k, v = (torch.randn(page, H, D) * 2).bfloat16(), torch.randn(page, H, D).bfloat16()
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[3, 1, 7], bad_v[5, 0, 0] = float("nan"), float("inf")
    clean_k, clean_v = k.clone(), v.clone()
    clean_k[3, 1, 7], clean_v[5, 0, 0] = 0.0, 0.0
    pool.set_kv_buffer(_Layer(1), loc, bad_k.view(page, -1), bad_v.view(page, -1))
    ref.set_kv_buffer(_Layer(1), loc, clean_k.view(page, -1), clean_v.view(page, -1))
    for layer in range(L):
        for a, b in zip(pool.layer_buffers(layer), ref.layer_buffers(layer)):
            assert torch.equal(a, b)  # the bytes of the same K/V with 0 in place of the bad values
    assert pool.nonfinite_layers([2]) == [1] and pool.nonfinite_layers([1, 3]) == []
    assert pool.nonfinite_layers([]) == []
    huge = k.clone()
    huge[0, 0, 0] = 2.0**70
    pool.set_kv_buffer(_Layer(0), loc, huge.view(page, -1), v.view(page, -1))
    assert pool.nonfinite_layers([2]) == [0, 1]
    pool.set_kv_buffer(_Layer(1), loc, k.view(page, -1), v.view(page, -1))  # the page's next owner
    pool.set_kv_buffer(_Layer(0), loc, k.view(page, -1), v.view(page, -1))
    assert pool.nonfinite_layers([2]) == []
    pool.set_kv_buffer(_Layer(1), loc, bad_k.view(page, -1), bad_v.view(page, -1))
    part = loc[:3]  # a next owner that writes only the page's first 3 slots (the bad ones were 3, 5)
    pool.set_kv_buffer(_Layer(1), part, k[:3].reshape(3, -1), v[:3].reshape(3, -1))
    assert pool.nonfinite_layers([2]) == []  # the freed owner's flags in slots 3..page-1 are gone
    pool.set_kv_buffer(_Layer(1), loc[3:4], bad_k[3:4].reshape(1, -1), v[3:4].reshape(1, -1))
    assert pool.nonfinite_layers([2]) == [1]  # a chunk continuing the page keeps its own flags
    pool.set_kv_buffer(_Layer(1), loc[4:6], k[4:6].reshape(2, -1), v[4:6].reshape(2, -1))
    assert pool.nonfinite_layers([2]) == [1]
