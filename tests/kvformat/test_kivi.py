"""int4_kivi: K per channel over 32-token blocks (bounds, byte placement, pool ops, refusals);
V is int4_g32's codec. int4_kivi_g64: the same K, V int4_g64's (exact bytes, codecs, handshake).
Golden bytes and doc tables are checked with the other formats."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_memha.kvformat import (
    TOKEN_LOCAL_FORMATS, Bridge, FormatDescriptor, FormatMismatchError, KVFormat, get_codec, kv_bytes_per_token,
    page_geometry, row_bytes, side_format)
from sglang_memha.kvformat.base import bf16_round
from sglang_memha.kvformat.kivi import BLOCK
from sglang_memha.kvformat.layout import PoolLayout

from .test_codecs import make

K = get_codec(KVFormat.INT4_KIVI, role="k")


def excess(x: torch.Tensor) -> float:
    """max of |x - x_hat| - bound over elements (<= 0: within). Bound per (block, head, channel):
    scale_b / 2 (plus 2^-20 of the channel's block magnitude for fp32 arithmetic), and the stored
    scale_b itself within its analytic bound (directed bf16 rounding, as int4)."""
    data, scales = K.quantize(x)
    t, h, d = x.shape
    x32 = x.float()
    blocks = x32.reshape(t // BLOCK, BLOCK, h, d)
    lo, hi = blocks.amin(1), blocks.amax(1)  # [NB, H, D]
    table = scales.float().reshape(t // BLOCK, BLOCK, h, d // BLOCK, 2).permute(0, 2, 1, 3, 4).reshape(-1, h, d, 2)
    s_b = table[..., 0]
    s_max = ((hi - lo) + lo.abs() * 2.0**-7) / 15 * (1 + 2.0**-7)
    assert bool((s_b <= s_max * (1 + 2.0**-20) + 1e-30).all()), "stored scale exceeds its analytic bound"
    err = (K.dequantize(data, scales, torch.float32) - x32).reshape(blocks.shape).abs()
    # + 2^-126: a channel whose range is fp32-subnormal gets (max - min) / 15 = 0 (underflow)
    slack = 2.0**-20 * blocks.abs().amax(1) + 2.0**-126
    return float((err - (s_b / 2 + slack)[:, None]).max())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dist", ["normal", "heavy", "outlier", "tiny"])
def test_round_trip_within_bound(head_dim, dtype, dist):
    x = make(dist, (64, 4, head_dim), seed=head_dim)
    if dtype == torch.float16 and dist == "tiny":
        x = x * 1e4  # keep fp16 out of subnormals
    assert excess(x.to(dtype)) <= 0


def _floats(max_exp: int) -> st.SearchStrategy:
    return st.lists(st.floats(-(2.0**max_exp), 2.0**max_exp, allow_nan=False, width=32), min_size=BLOCK, max_size=BLOCK)


@settings(max_examples=60, deadline=None)
@given(u=_floats(28), v=_floats(28), w=_floats(60))
def test_round_trip_hypothesis(u, v, w):
    """x[t, c] = u[t] * v[c] + w[c]: one block, head_dim 32, per-token magnitudes, per-channel
    gains and offsets (|x| <= 2^61, inside the codecs' input range)."""
    x = torch.tensor(u)[:, None] * torch.tensor(v)[None, :] + torch.tensor(w)[None, :]
    assert excess(x.reshape(BLOCK, 1, BLOCK)) <= 0


def test_channel_offsets_cost_nothing_unlike_token_groups():
    """What the format is for: a K channel with a large offset. Per-channel groups keep the other
    channels' error at their own scale; int4_g32's per-token groups spread it over the row."""
    x = make("normal", (64, 2, 64), seed=3)
    x[..., 7] += 60.0
    kivi = (K.dequantize(*K.quantize(x), torch.float32) - x).abs()
    g32 = get_codec("int4_g32")
    tok = (g32.dequantize(*g32.quantize(x), torch.float32) - x).abs()
    others = [c for c in range(64) if c != 7]
    assert float(kivi[..., others].mean()) < 0.25 * float(tok[..., others].mean())


def test_scale_row_r_holds_channels_of_its_share():
    """Row r of a block holds (scale_b, min_b) of channels [r * D/32, (r + 1) * D/32): compare with
    each channel's block min and max taken directly and rounded by the spec's rule."""
    d = 128
    x = make("outlier", (2 * BLOCK, 3, d), seed=5)
    _, scales = K.quantize(x)
    per = d // BLOCK
    for b in range(2):
        block = x[b * BLOCK:(b + 1) * BLOCK]
        min_b = bf16_round(block.amin(0), up=False)  # [H, D]
        scale_b = bf16_round((block.amax(0) - min_b.float()) / 15, up=True)
        for r in (0, 7, 31):
            got = scales[b * BLOCK + r]  # [H, D/32, 2]
            assert torch.equal(got[..., 1], min_b[:, r * per:(r + 1) * per])
            assert torch.equal(got[..., 0], scale_b[:, r * per:(r + 1) * per])


def test_matches_the_offline_emulation_bit_for_bit():
    """eval/quality_offline's int4kivi emulation (which the RESULTS candidate table measured) and
    the codec compute the same values on whole blocks."""
    from eval.quality_offline import kivi_k_fake

    x = make("heavy", (3 * BLOCK, 2, 64), seed=11)
    y = K.dequantize(*K.quantize(x), torch.float32)
    assert torch.equal(y, kivi_k_fake(x.permute(1, 0, 2), BLOCK).permute(1, 0, 2))


def test_shapes_geometry_and_scale_bytes():
    geo = page_geometry(KVFormat.INT4_KIVI, page_size=BLOCK, num_kv_heads=2, head_dim=128)
    data, scales = K.quantize(torch.randn(BLOCK, 2, 128))
    assert data.dtype == torch.uint8 and data.numel() == geo.data_bytes
    raw = K.scale_bytes(scales)
    assert raw.shape == (BLOCK, 2, geo.scale_bytes_per_head) and raw.numel() == geo.scale_bytes
    assert torch.equal(K.scales_from_bytes(raw), scales)
    g32 = page_geometry(KVFormat.INT4_G32, BLOCK, 2, 128)
    assert (geo.data_bytes_per_head, geo.scale_bytes_per_head) == (g32.data_bytes_per_head, g32.scale_bytes_per_head)


def test_zero_blocks_are_canonical():
    x = torch.zeros(2 * BLOCK, 2, 64)
    x[::3, 0] = -0.0
    x[BLOCK + 1, 1, 9] = 2.0
    data, scales = K.quantize(x)
    y = K.dequantize(data, scales, torch.float32)
    assert torch.equal(y[:BLOCK], torch.zeros(BLOCK, 2, 64))
    assert int(data[:BLOCK].max()) == 0 and int(K.scale_bytes(scales)[:BLOCK].max()) == 0  # +0, never -0
    assert excess(x) <= 0
    empty = K.quantize(torch.zeros(0, 2, 64))
    assert K.dequantize(*empty).shape == (0, 2, 64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 2.0**65])
def test_non_finite_rejected_with_index(bad):
    x = torch.ones(BLOCK, 2, 64)
    x[17, 1, 5] = bad
    with pytest.raises(ValueError, match=r"index \(17, 1, 5\)"):
        K.quantize(x)


def test_partial_block_is_refused():
    with pytest.raises(ValueError, match="num_tokens=31 is not a multiple of the 32-token block"):
        K.quantize(torch.randn(31, 1, 64))
    data, scales = K.quantize(torch.randn(BLOCK, 1, 64))
    with pytest.raises(ValueError, match="num_tokens=16"):
        K.dequantize(data[:16], scales[:16])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_out_dtype_is_rounded_fp32_result(out_dtype):
    data, scales = K.quantize(torch.randn(BLOCK, 2, 64))
    assert torch.equal(K.dequantize(data, scales, out_dtype), K.dequantize(data, scales, torch.float32).to(out_dtype))


def test_quantize_into_pool_and_gather_pages():
    page, heads, d = 2 * BLOCK, 2, 64
    geo = page_geometry(KVFormat.INT4_KIVI, page, heads, d)
    data_pool = torch.zeros(4 * page, heads, geo.data_bytes_per_head, dtype=torch.uint8)
    scale_pool = torch.zeros(4 * page, heads, geo.scale_bytes_per_head, dtype=torch.uint8)
    x = torch.randn(2 * page, heads, d)
    loc = torch.cat([torch.arange(3 * page, 4 * page), torch.arange(page, 2 * page)])  # pages 3, 1
    K.quantize_into(x, loc, data_pool, scale_pool)
    got = K.gather_dequantize(data_pool, scale_pool, torch.tensor([3, 1]), page, torch.float32)
    assert torch.equal(got, K.dequantize(*K.quantize(x), torch.float32))
    with pytest.raises(ValueError, match=r"loc\[0:32\] is not one aligned block"):
        K.quantize_into(x[:BLOCK], torch.arange(1, BLOCK + 1), data_pool, scale_pool)
    with pytest.raises(ValueError, match=r"loc\[32:64\] is not one aligned block"):
        K.quantize_into(x[:page], torch.cat([torch.arange(BLOCK), torch.arange(BLOCK).flip(0) + BLOCK]),
                        data_pool, scale_pool)
    with pytest.raises(ValueError, match="page_size=16 must be a multiple of the 32-token K block"):
        K.gather_dequantize(data_pool, scale_pool, torch.tensor([0]), 16)


def test_roles():
    assert get_codec("int4_kivi", role="v") is get_codec("int4_g32")
    assert get_codec("int8", role="v") is get_codec("int8", role="k") is get_codec("int8")
    with pytest.raises(ValueError, match=r"int4_kivi codes K and V differently: call get_codec\('int4_kivi', role="):
        get_codec("int4_kivi")
    with pytest.raises(ValueError, match="role='q'"):
        get_codec("int8", role="q")


def test_handshake_moves_kivi_pages_as_they_are():
    """Same format and page size: accepted, no bridge. A bf16 prefill is not encoded on send to
    int4_kivi, nor are int4_kivi pages re-paged (both rewrite single rows); both name the field."""
    assert KVFormat.INT4_KIVI not in TOKEN_LOCAL_FORMATS and KVFormat.INT4_G32 in TOKEN_LOCAL_FORMATS
    kw = dict(num_kv_heads=3, head_dim=64, num_layers=30, model_id="m")
    kivi = FormatDescriptor(fmt="int4_kivi", page_size=32, **kw)
    assert kivi.check_compatible(FormatDescriptor(fmt="int4_kivi", page_size=32, **kw)) == []
    with pytest.raises(FormatMismatchError, match=r"fmt: local='int4_kivi' peer='bf16'"):
        kivi.check_compatible(FormatDescriptor(fmt="bf16", page_size=32, **kw))
    with pytest.raises(FormatMismatchError, match=r"page_size \(int4_kivi pages are not re-paged\): local=32 peer=64"):
        kivi.check_compatible(FormatDescriptor(fmt="int4_kivi", page_size=64, **kw))
    bf16 = FormatDescriptor(fmt="bf16", page_size=16, **kw)
    assert bf16.check_compatible(FormatDescriptor(fmt="bf16", page_size=32, **kw)) == [Bridge.REPAGE]


# ---- int4_kivi_g64: int4_kivi's K, int4_g64's V (issue 22) --------------------------------------

@pytest.mark.parametrize("head_dim,k_row,v_row,total", [(64, (32, 8), (32, 4), 76), (128, (64, 16), (64, 8), 152)])
def test_kivi_g64_exact_bytes_and_ratio(head_dim, k_row, v_row, total):
    """Rows: K D/2 + D/8 (int4_kivi's), V D/2 + D/16 (int4_g64's): 76 B at D = 64, 152 B at D = 128,
    19/64 = 0.296875 of bf16's 4D (<= 0.30, issue 22's wire goal), where int4_kivi is 0.3125."""
    fmt = KVFormat.INT4_KIVI_G64
    assert row_bytes(fmt, "k", head_dim) == k_row == row_bytes(KVFormat.INT4_KIVI, "k", head_dim)
    assert row_bytes(fmt, "v", head_dim) == v_row == row_bytes(KVFormat.INT4_G64, "v", head_dim)
    assert kv_bytes_per_token(fmt, 1, head_dim) == total and kv_bytes_per_token(fmt, 3, head_dim) == 3 * total
    ratio = kv_bytes_per_token(fmt, 8, head_dim) / kv_bytes_per_token(KVFormat.BF16, 8, head_dim)
    assert ratio == 19 / 64 == 0.296875 and ratio <= 0.30
    assert kv_bytes_per_token(KVFormat.INT4_KIVI, 1, head_dim) / (4 * head_dim) == 0.3125
    geo = page_geometry(fmt, BLOCK, 2, head_dim)
    assert (geo.data_bytes_per_head, geo.scale_bytes_per_head, geo.v_scale_bytes_per_head) == (*k_row, v_row[1])
    assert (geo.data_bytes, geo.scale_bytes, geo.v_scale_bytes) == (BLOCK * 2 * k_row[0], BLOCK * 2 * k_row[1],
                                                                   BLOCK * 2 * v_row[1])
    # a pool of 3 layers publishes [K data, K scale, V data, V scale] x 3, each with its own page bytes
    layout = PoolLayout(fmt, head_dim, 2, 3, BLOCK)
    page = BLOCK * 2
    assert layout.item_lens() == [page * n for n in (*k_row, *v_row) for _ in range(3)]
    assert sum(layout.token_lens()) == 3 * kv_bytes_per_token(fmt, 2, head_dim)


def test_kivi_g64_codecs_are_int4_kivi_k_and_int4_g64_v():
    assert get_codec("int4_kivi_g64", role="k") is K
    assert get_codec("int4_kivi_g64", role="v") is get_codec("int4_g64")
    assert side_format("int4_kivi_g64", "k") == KVFormat.INT4_KIVI
    assert side_format("int4_kivi_g64", "v") == KVFormat.INT4_G64
    assert side_format("int4_kivi", "v") == KVFormat.INT4_G32 and side_format("int8", "v") == KVFormat.INT8
    with pytest.raises(ValueError, match=r"int4_kivi_g64 codes K and V differently"):
        get_codec("int4_kivi_g64")
    with pytest.raises(ValueError, match="head_dim=32 is not valid for int4_kivi_g64: expected a positive multiple of 64"):
        kv_bytes_per_token("int4_kivi_g64", 1, 32)
    with pytest.raises(ValueError, match="head_dim=96 is not valid for int4_kivi_g64"):
        PoolLayout("int4_kivi_g64", 96, 1, 1, BLOCK)
    assert KVFormat.INT4_KIVI_G64 not in TOKEN_LOCAL_FORMATS


def test_kivi_g64_round_trip_k_within_bound_and_v_is_g64():
    x = make("outlier", (2 * BLOCK, 3, 128), seed=21)
    assert excess(x) <= 0  # K: int4_kivi's codec and bound
    v = get_codec("int4_kivi_g64", role="v")
    data, scales = v.quantize(x)
    assert data.shape == (2 * BLOCK, 3, 64) and v.scale_bytes(scales).shape == (2 * BLOCK, 3, 8)
    err = (v.dequantize(data, scales, torch.float32) - x).abs().reshape(2 * BLOCK, 3, 2, 64)
    assert bool((err <= scales.float()[..., 0:1] * (0.5 + 2.0**-19) + x.abs().amax() * 2.0**-24 + 2.0**-150).all())


def test_handshake_moves_kivi_g64_pages_as_they_are():
    """int4_kivi_g64 pairs only with itself at the same page size: not with int4_kivi (V rows
    differ), not encoded on send from bf16, not re-paged; each refusal names the field."""
    kw = dict(num_kv_heads=3, head_dim=64, num_layers=30, model_id="m")
    g64 = FormatDescriptor(fmt="int4_kivi_g64", page_size=32, **kw)
    assert FormatDescriptor.from_bytes(g64.to_bytes()) == g64
    assert g64.check_compatible(FormatDescriptor(fmt="int4_kivi_g64", page_size=32, **kw)) == []
    for peer in ("int4_kivi", "bf16", "int4_g64"):
        with pytest.raises(FormatMismatchError, match=rf"fmt: local='int4_kivi_g64' peer='{peer}'"):
            g64.check_compatible(FormatDescriptor(fmt=peer, page_size=32, **kw))
    with pytest.raises(FormatMismatchError, match=r"fmt: local='int4_kivi' peer='int4_kivi_g64'"):
        FormatDescriptor(fmt="int4_kivi", page_size=32, **kw).check_compatible(g64)
    with pytest.raises(FormatMismatchError,
                       match=r"page_size \(int4_kivi_g64 pages are not re-paged\): local=32 peer=64"):
        g64.check_compatible(FormatDescriptor(fmt="int4_kivi_g64", page_size=64, **kw))
    with pytest.raises(FormatMismatchError, match=r"page_size \(int4_kivi_g64 pages are not re-paged\)"):
        FormatDescriptor(fmt="int8", page_size=64, **kw).check_compatible(g64)
