"""Candidate-fix modes of eval/quality_offline.py (fake quantization only, no model; < 10 s)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from eval.quality_offline import (  # noqa: E402
    MODES,
    CANDIDATE_MODES,
    ModeSpec,
    anchor_rows,
    fake_k,
    fake_quant,
    fake_v,
    int4a_fake,
    k_channel_mean,
    kivi_k_fake,
    mode_bytes,
    parse_mode,
    token_fake,
)
from sglang_memha.kvformat import get_codec  # noqa: E402
from sglang_memha.kvformat.transforms import rotate, unrotate  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def biased_k(t=80, h=3, d=64, seed=0, dtype=torch.bfloat16):
    """[1, H, T, D] K with large planted per-channel biases (SmolLM2-like) and an outlier channel."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, h, t, d, generator=g)
    bias = torch.zeros(d)
    bias[3], bias[17], bias[40] = 12.0, -20.0, 7.5
    k = k + bias
    k[..., 50] *= 8.0
    return k.to(dtype)


# ---- parser -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [m for m in MODES.split(",")] + CANDIDATE_MODES.split(",") + [
    "int4a_g32", "int4a_g16+had", "fp8_e4m3+kmean+had", "int4a_g64+kmean+anchor16+had", "int4kivi_t16",
    "int4kivi_t32+kmean+had", "int4a_g64+anchor32", "int4_kivi", "int4_kivi+had", "int4_g64+kmean+had_Konly", "int4a_g64_Vonly", "bf16+kmean"])
def test_parser_accepts(mode):
    parse_mode(mode)
    fake_quant(mode)


@pytest.mark.parametrize("mode", [
    "", "int4", "int4a", "int4a_g", "int4a_g48", "int4a_g4", "int4a_g256", "int4_g64+hadamard", "int4a_g64+had+kmean",
    "int4a_g64+had+anchor16", "int4a_g64+kmean+kmean", "int4a_g64+anchor", "int4a_g64+anchor1", "int4kivi_t1",
    "int4kivi_t32+anchor16", "int4_kivi+anchor16", "int4_kivi_g64+anchor16", "int4a_g64+kmean_Vonly", "noise_ulp+had",
    "int4a_g64+", "+had", "fp8+had",
    "int4a_g64_Konly_Vonly", "int4a_g64+had_konly"])
def test_parser_rejects(mode):
    with pytest.raises(ValueError):
        parse_mode(mode)


def test_parser_fields():
    assert parse_mode("int4a_g64+kmean+anchor16+had_Konly") == ModeSpec(
        "int4a_g64", kmean=True, anchor=16, had=True, k_only=True)
    assert parse_mode("int4_g64+had").legacy and not parse_mode("int4_g64+kmean+had").legacy
    assert not parse_mode("int4a_g64").legacy
    assert parse_mode("int4kivi_t32").v_fmt == "int4a_g64"


# ---- asymmetric int4 ----------------------------------------------------------------------------

@pytest.mark.parametrize("group", [16, 32, 64])
def test_int4a_error_within_half_scale(group):
    x = biased_k(dtype=torch.float32).float() * 3.0 + 1.0
    y, s = int4a_fake(x, group)
    assert y.shape == x.shape == s.shape
    assert ((x - y).abs() <= s / 2 * (1 + 1e-6)).all()
    # scale and zero are bf16 values, codes in 0..15
    g = x.reshape(*x.shape[:-1], -1, group)
    sc = s.reshape(g.shape)[..., 0]
    assert torch.equal(sc, sc.to(torch.bfloat16).float())
    codes = (y.reshape(g.shape) - y.reshape(g.shape).amin(-1, keepdim=True)) / torch.where(sc > 0, sc, 1)[..., None]
    assert codes.min() >= -1e-4 and codes.max() <= 15 + 1e-4


def test_int4a_along_token_dim_and_constant_group():
    x = biased_k(dtype=torch.float32)
    y, s = int4a_fake(x, 16, dim=-2)
    assert ((x - y).abs() <= s / 2 * (1 + 1e-6)).all()
    c = torch.full((2, 64), 1.5)  # a constant bf16 group is reproduced exactly
    assert torch.equal(int4a_fake(c, 32)[0], c)


@pytest.mark.parametrize("group", [32, 64])
def test_int4a_matches_shipped_int4_codec(group):
    """The shipped int4_g32/int4_g64 codecs are already asymmetric: int4a is the same math."""
    x = biased_k(t=40)  # bf16
    rows = x[0].permute(1, 0, 2).contiguous()  # [T, H, D]
    codec = get_codec(f"int4_g{group}")
    ref = codec.dequantize(*codec.quantize(rows), torch.float32)
    mine = int4a_fake(rows.float(), group)[0]
    assert torch.equal(mine, ref)


# ---- kmean --------------------------------------------------------------------------------------

def test_kmean_equals_quantizing_centered_input():
    k = biased_k()
    m = k.float().mean(-2, keepdim=True).to(torch.bfloat16).float()
    assert torch.equal(k_channel_mean(k), m)
    centered = k.float() - m
    for fmt, had in [("int4a_g64", False), ("int4a_g32", True), ("fp8_e4m3", True), ("int4_g64", True)]:
        spec = parse_mode(f"{fmt}+kmean" + ("+had" if had else ""))
        want = unrotate(token_fake(rotate(centered), fmt)) if had else token_fake(centered, fmt)
        assert torch.equal(fake_k(k, spec), want.to(k.dtype)), fmt


def test_kmean_keeps_attention_and_cuts_int4_error():
    k = biased_k(dtype=torch.float32)
    q = torch.randn(1, 3, 80, 64, generator=torch.Generator().manual_seed(5))
    m = k_channel_mean(k)
    exact = torch.softmax(q @ k.transpose(-1, -2), -1)
    # the mean is not added back: softmax is invariant to the per-query constant q . m
    assert torch.allclose(torch.softmax(q @ (k - m).transpose(-1, -2), -1), exact, atol=1e-5)
    # bf16 identity + kmean = the centered K rounded to bf16 (what mode bf16+kmean measures)
    kc = fake_k(k, parse_mode("bf16+kmean"))
    assert torch.equal(kc, (k - m).to(torch.bfloat16).float())
    err = {}
    for mode in ["int4a_g64", "int4a_g64+kmean", "int4a_g64+kmean+had"]:
        spec = parse_mode(mode)
        kq = fake_k(k, spec)
        ref = k - k_channel_mean(k) if spec.kmean else k
        err[mode] = (kq - ref).pow(2).mean().item()
    assert err["int4a_g64+kmean"] < 0.5 * err["int4a_g64"]
    assert err["int4a_g64+kmean+had"] < err["int4a_g64"]


# ---- anchor -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int4a_g64+anchor16", "int4a_g64+anchor16+had", "int4_g32+anchor16+had",
                                  "int4a_g64+kmean+anchor16+had"])
def test_anchor_rows_exact_and_rest_is_offset_quant(mode):
    spec = parse_mode(mode)
    k = biased_k(t=75)  # partial last page
    y = fake_k(k, spec)
    base = k.float() - (k_channel_mean(k) if spec.kmean else 0)
    a = anchor_rows(base, 16)
    assert torch.equal(y[..., ::16, :], base[..., ::16, :].to(torch.bfloat16).to(k.dtype))
    assert torch.equal(a[..., 16:32, :], a[..., 16:17, :].expand(-1, -1, 16, -1))
    d = base - a
    fmt = spec.fmt
    deq = unrotate(token_fake(rotate(d), fmt)) if spec.had else token_fake(d, fmt)
    want = (a + deq)
    want[..., ::16, :] = a[..., ::16, :]
    assert torch.equal(y, want.to(k.dtype))


def test_anchor_offset_error_bound_without_had():
    k = biased_k().float()  # bf16 values (as in the bf16 setting): anchor rows are exact
    y = fake_k(k, parse_mode("int4a_g64+anchor16"))
    a = anchor_rows(k, 16)
    _, s = int4a_fake(k - a, 64)
    assert ((y - k).abs() <= s / 2 * (1 + 1e-5) + 1e-6).all()


# ---- kivi ---------------------------------------------------------------------------------------

def test_kivi_per_channel_blocks():
    k = biased_k(t=70, dtype=torch.float32)  # 2 full blocks of 32 + a tail of 6
    y = kivi_k_fake(k, 32)
    assert y.shape == k.shape
    for lo, hi in [(0, 32), (32, 64), (64, 70)]:
        blk = k[..., lo:hi, :]
        yb, s = int4a_fake(blk, hi - lo, dim=-2)
        assert torch.equal(y[..., lo:hi, :], yb)
        assert ((blk - yb).abs() <= s / 2 * (1 + 1e-6)).all()
    # per-channel scales absorb the channel bias: far better than per-token int4 on this K
    e_kivi = (y - k).pow(2).mean()
    e_tok = (int4a_fake(k, 64)[0] - k).pow(2).mean()
    assert e_kivi < 0.5 * e_tok
    fk, fv = fake_quant("int4kivi_t32")
    v = biased_k(seed=1)
    assert torch.equal(fv(v), int4a_fake(v.float(), 64)[0].to(v.dtype))
    assert fk(k.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("mode,v_fmt,total", [("int4_kivi", "int4_g32", 80), ("int4_kivi_g64", "int4_g64", 76)])
def test_int4_kivi_mode_runs_the_codec_and_keeps_the_open_block(mode, v_fmt, total):
    """int4_kivi(_g64): whole blocks through the real K codec (equal to the emulation there), the
    tail of 6 tokens untouched (the format's bf16 residual); V through int4_g32's (int4_g64's) codec."""
    k = biased_k(t=70)
    fk, fv = fake_quant(mode)
    y = fk(k)
    assert torch.equal(y[..., 64:, :], k[..., 64:, :])
    assert torch.equal(y[..., :64, :], kivi_k_fake(k[..., :64, :].float(), 32).to(k.dtype))
    assert not torch.equal(y[..., :64, :], k[..., :64, :])
    vc = get_codec(v_fmt)
    v = biased_k(seed=3)
    rows = v[0].permute(1, 0, 2).contiguous()
    assert torch.equal(fv(v), vc.dequantize(*vc.quantize(rows), v.dtype).permute(1, 0, 2)[None])
    assert parse_mode(mode).v_fmt == v_fmt and parse_mode(mode).block_coded
    assert mode_bytes(mode)["total"] == total  # int4_kivi_g64: K 32 + 8, V 32 + 4 (0.297 of bf16)


# ---- fake_quant wiring, bytes -------------------------------------------------------------------

def test_konly_vonly_and_legacy_unchanged():
    fk, fv = fake_quant("int4a_g64+kmean+had_Konly")
    assert fk is not None and fv is None
    fk, fv = fake_quant("int4a_g64_Vonly")
    assert fk is None and fv is not None
    # a legacy mode still runs the codec directly (V dequantized straight to the model dtype)
    v = biased_k(seed=2)
    _, fv = fake_quant("int4_g64+had")
    codec = get_codec("int4_g64")
    rows = v[0].permute(1, 0, 2).contiguous()
    want = codec.dequantize(*codec.quantize(rows), v.dtype).permute(1, 0, 2)[None]
    assert torch.equal(fv(v), want)
    assert torch.equal(fake_v(v, parse_mode("int4a_g64")), want)  # same math, same result


def test_mode_bytes():
    assert mode_bytes("bf16")["total"] == 256
    assert mode_bytes("int4_g64+had")["total"] == 72
    assert mode_bytes("int4a_g64")["total"] == 72
    assert mode_bytes("int4a_g32+had")["total"] == 80
    assert mode_bytes("int4a_g16")["k"] == 48
    assert mode_bytes("fp8_e4m3")["total"] == 132
    kb = mode_bytes("int4a_g64+kmean+had", tokens=512)
    assert kb["k"] == 36 + 0.25 and kb["request_bytes_per_layer_head"] == 128
    assert mode_bytes("int4a_g64+anchor16+had")["k"] == 44
    kv = mode_bytes("int4kivi_t32")
    assert (kv["k"], kv["v"]) == (40, 36)
    assert mode_bytes("int4kivi_t16")["k"] == 48


# ---- koff (the product's static K offset, kvformat/k_offset.py) ----------------------------------
@pytest.mark.parametrize("mode", ["fp8_e4m3+koff", "fp8_e4m3+koff+had", "int8+koff+had", "int4_kivi+koff",
                                  "int4a_g64+koff+kmean+had"])
def test_koff_modes_parse_in_order(mode):
    spec = parse_mode(mode)
    assert spec.koff and not spec.legacy


@pytest.mark.parametrize("mode", ["fp8_e4m3+had+koff", "fp8_e4m3+kmean+koff", "fp8_e4m3+koff+koff", "fp8_e4m3+koff_Vonly"])
def test_koff_modes_rejected_out_of_order(mode):
    with pytest.raises(ValueError):
        parse_mode(mode)


@pytest.mark.parametrize("had", [False, True])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_koff_mode_equals_the_pool_with_the_offset(fmt, had, tmp_path):
    """The eval's +koff emulation reads back, bit for bit, what MemhaQuantKVPool with
    MEMHA_K_OFFSET returns for the same K (so the offline figures are the product's)."""
    pytest.importorskip("sglang.srt.mem_cache.memory_pool")
    from sglang_memha.kvformat import k_offset
    from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool
    import eval.quality_offline as qo

    layers, h, t, d = 3, 2, 40, 64
    g = torch.Generator().manual_seed(2)
    c = torch.randn(layers, h, d, generator=g) * 4
    path = str(tmp_path / "k.safetensors")
    off = k_offset.save(path, c, "test#0", {})
    k = (torch.randn(1, h, t, d, generator=g) * 2 + off.values[1][None, :, None, :]).to(torch.bfloat16)
    qo.K_OFFSET.update(values=off.values, layer=1)
    try:
        got = qo.fake_k(k, parse_mode(f"{fmt}+koff" + ("+had" if had else "")))
    finally:
        qo.K_OFFSET.update(values=None, layer=0)
    pool = MemhaQuantKVPool.configured(fmt, "hadamard" if had else "none", "test#0", path)(
        64, page_size=16, dtype=torch.bfloat16, head_num=h, head_dim=d, layer_num=layers, device="cpu",
        enable_memory_saver=False)
    rows = k[0].transpose(0, 1).reshape(t, h * d)  # [T, H*D], token-major as attention writes
    loc = torch.arange(16, 16 + t)

    class _L:
        layer_id = 1
    pool.set_kv_buffer(_L, loc, rows, rows)
    want = pool.get_key_buffer(1)[loc].transpose(0, 1)[None]  # back to [1, H, T, D]
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
