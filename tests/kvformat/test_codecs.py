"""Round trips within the analytic bounds, shapes/dtypes, zeros, non-finite rejection, pool ops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_memha.kvformat import TOKEN_LOCAL_FORMATS, KVFormat, get_codec, page_geometry

from .bounds import max_excess

FORMATS = list(TOKEN_LOCAL_FORMATS)  # the token-local formats; int4_kivi has its own tests (test_kivi.py)
PER_TOKEN = [f for f in FORMATS if f != KVFormat.FP8_E4M3_TENSOR]


def make(dist: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if dist == "heavy":  # Cauchy-like: ratio of normals, a few huge values
        x = x / torch.randn(shape, generator=g).abs().clamp_min(1e-3)
    elif dist == "outlier":  # post-RoPE K style: a few channels 50-200x larger
        x[..., 3] *= 200.0
        x[..., 17] *= -50.0
    elif dist == "tiny":
        x = x * 1e-6
    return x


@pytest.mark.parametrize("fmt", PER_TOKEN, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dist", ["normal", "heavy", "outlier", "tiny"])
def test_round_trip_within_bound(fmt, head_dim, dtype, dist):
    x = make(dist, (16, 4, head_dim), seed=head_dim).to(dtype)
    if dtype == torch.float16 and dist == "tiny":
        x = make(dist, (16, 4, head_dim), seed=1).mul(1e4).to(dtype)  # keep fp16 out of subnormals
    assert max_excess(fmt, x) <= 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dist", ["normal", "heavy", "outlier"])
def test_fp8_tensor_within_bound(dtype, dist):
    x = make(dist, (16, 4, 128), seed=3).to(dtype)
    layer_scale = float(x.float().abs().max()) / 400  # a calibrated scale: no saturation
    assert max_excess(KVFormat.FP8_E4M3_TENSOR, x, layer_scale) <= 0


def test_fp8_tensor_saturates_and_matches_sglang_write():
    x = torch.tensor([[[-1000.0, 500.0, 3.0, -0.0] * 4]], dtype=torch.bfloat16)
    codec = get_codec("fp8_e4m3_tensor")
    data, scale = codec.quantize(x, 0.5)
    # SGLang's MHATokenToKVPool.set_kv_buffer: cache_k.div_(k_scale).to(float8_e4m3fn).view(uint8)
    ref = x.clone().div_(0.5).to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(data, ref)
    y = codec.dequantize(data, scale, torch.float32)
    assert y[0, 0, :4].tolist() == [-224.0, 224.0, 3.0, 0.0]  # saturated to +-448 * 0.5


@settings(max_examples=60, deadline=None)
@given(
    fmt=st.sampled_from(PER_TOKEN),
    rows=st.lists(
        st.lists(st.floats(-(2.0**60), 2.0**60, allow_nan=False, width=32), min_size=64, max_size=64),
        min_size=1, max_size=3,
    ),
)
def test_round_trip_hypothesis(fmt, rows):
    x = torch.tensor(rows, dtype=torch.float32).reshape(len(rows), 1, 64)
    assert max_excess(fmt, x) <= 0


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_zero_tokens_and_zero_rows(fmt):
    codec = get_codec(fmt)
    x = torch.zeros(3, 2, 64)
    x[1, 1] = torch.linspace(-1, 1, 64)
    x[2, 0] = -0.0
    data, scales = codec.quantize(x)
    y = codec.dequantize(data, scales, torch.float32)
    assert torch.equal(y[0], torch.zeros(2, 64)) and bool((y[2, 0] == 0).all())
    if fmt not in (KVFormat.BF16, KVFormat.FP8_E4M3_TENSOR):
        assert int(data[0].max()) == 0 and int(data[2, 0].max()) == 0  # canonical zero bytes
    empty_data, empty_scales = codec.quantize(torch.zeros(0, 2, 64))
    assert empty_data.shape[0] == 0
    assert codec.dequantize(empty_data, empty_scales).shape == (0, 2, 64)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 2.0**65])
def test_non_finite_rejected_with_index(fmt, bad):
    x = torch.ones(2, 2, 64)
    x[1, 0, 5] = bad
    with pytest.raises(ValueError, match=r"index \(1, 0, 5\)"):
        get_codec(fmt).quantize(x)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_shapes_and_dtypes_match_geometry(fmt):
    codec = get_codec(fmt)
    geo = page_geometry(fmt, page_size=16, num_kv_heads=2, head_dim=128)
    data, scales = codec.quantize(torch.randn(16, 2, 128))
    assert data.dtype == torch.uint8 and data.shape == (16, 2, geo.data_bytes_per_head)
    assert data.numel() == geo.data_bytes
    raw = codec.scale_bytes(scales)
    assert (0 if raw is None else raw.numel()) == geo.scale_bytes
    if raw is not None:
        assert raw.shape == (16, 2, geo.scale_bytes_per_head)
        assert torch.equal(codec.scales_from_bytes(raw), scales)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_out_dtype_is_rounded_fp32_result(fmt, out_dtype):
    codec = get_codec(fmt)
    data, scales = codec.quantize(torch.randn(4, 2, 64))
    y32 = codec.dequantize(data, scales, torch.float32)
    y = codec.dequantize(data, scales, out_dtype)
    assert y.dtype == out_dtype and torch.equal(y, y32.to(out_dtype))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=torch.randn(4, 64)), r"x.shape=\(4, 64\)"),
        (dict(x=torch.randn(2, 2, 64, dtype=torch.float64)), r"x.dtype=torch.float64"),
        (dict(x=torch.randn(2, 2, 48)), r"head_dim=48 is not valid for int4_g32"),
    ],
)
def test_bad_inputs_name_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        get_codec("int4_g32").quantize(**kwargs)


def test_bad_scales_and_unknown_format():
    codec = get_codec("int8")
    data, scales = codec.quantize(torch.randn(2, 2, 64))
    with pytest.raises(ValueError, match=r"scales=\(2, 2, 1\) torch.bfloat16: expected \(2, 2, 1\) torch.float32"):
        codec.dequantize(data, scales.bfloat16())
    with pytest.raises(ValueError, match="kv format 'fp4' is not supported; expected one of: bf16, fp8_e4m3"):
        get_codec("fp4")
    with pytest.raises(ValueError, match="scale=0.0"):
        get_codec("fp8_e4m3_tensor").quantize(torch.randn(1, 1, 64), 0.0)


@pytest.mark.parametrize("fmt", PER_TOKEN, ids=str)
def test_quantize_into_pool_and_gather_pages(fmt):
    codec = get_codec(fmt)
    page, heads, d = 4, 2, 64
    geo = page_geometry(fmt, page, heads, d)
    slots = 6 * page
    data_pool = torch.zeros(slots, heads, geo.data_bytes_per_head, dtype=torch.uint8)
    scale_pool = torch.zeros(slots, heads, geo.scale_bytes_per_head, dtype=torch.uint8)
    x = torch.randn(8, heads, d)
    loc = torch.tensor([12, 13, 14, 15, 4, 5, 6, 7])  # pages 3 and 1
    codec.quantize_into(x, loc, data_pool, scale_pool)
    got = codec.gather_dequantize(data_pool, scale_pool, torch.tensor([3, 1]), page, torch.float32)
    data, scales = codec.quantize(x)
    assert torch.equal(got, codec.dequantize(data, scales, torch.float32))
    # a page is one contiguous byte range of the data pool and one of the scale pool
    flat = data_pool.reshape(-1)
    assert torch.equal(flat[3 * geo.data_bytes:4 * geo.data_bytes], data[:4].reshape(-1))
    if geo.scale_bytes:
        sflat = scale_pool.reshape(-1)
        assert torch.equal(sflat[1 * geo.scale_bytes:2 * geo.scale_bytes], codec.scale_bytes(scales)[4:].reshape(-1))
