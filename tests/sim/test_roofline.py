"""Roofline and capacity against hand-computed cases."""

from dataclasses import replace

import numpy as np
import pytest

from eval.sim.config import load_device, load_model
from eval.sim.memory import kv_capacity_tokens
from eval.sim.roofline import (decode_cost, kv_bytes_per_token_model, prefill_attention_flops,
                               prefill_step_time)


def _compute_only(dev_name="h100-sxm", tflops=1.0):
    """A device whose every op is compute-bound (memory bandwidth ~infinite), no overheads."""
    return replace(load_device(dev_name), bf16_tflops=tflops, gemm_eff=1.0, attn_prefill_eff=1.0,
                   attn_decode_eff=1.0, mem_bw_gbps=1e12, mem_eff=1.0, prefill_step_overhead_s=0.0,
                   decode_step_overhead_s=0.0, decode_per_request_overhead_s=0.0, attn_tflops=0.0)


def test_param_counts_match_published_sizes():
    # SmolLM2-135M: 134.5 M parameters (tied embeddings), real-model FINDINGS section 2
    assert load_model("smollm2-135m").total_params == pytest.approx(134.5e6, rel=0.002)
    # Qwen3-8B model card: 8.2 B parameters; Qwen3-32B: 32.8 B
    assert load_model("qwen3-8b").total_params == pytest.approx(8.19e9, rel=0.01)
    assert load_model("qwen3-32b").total_params == pytest.approx(32.8e9, rel=0.01)


def test_kv_bytes_match_measured_smollm2():
    # baseline FINDINGS: 4096 tokens of SmolLM2 KV = 94,371,840 B (23,040 B per token)
    m = load_model("smollm2-135m")
    assert kv_bytes_per_token_model(m, "bf16") == 23040
    # fp8 with one bf16 scale per (token, head): 30 layers * 2 * 3 * (64 + 2)
    assert kv_bytes_per_token_model(m, "fp8_e4m3") == 30 * 2 * 3 * 66


def test_causal_attention_flops_hand():
    m = load_model("tiny-qwen3")  # 4 heads, head_dim 64
    # chunk of 3 new tokens after 2 cached: positions see 3, 4, 5 keys -> 12 q.k pairs
    assert prefill_attention_flops(m, np.array([3]), np.array([2])) == 4 * 4 * 64 * 12


def test_prefill_time_compute_bound_hand():
    m = load_model("tiny-qwen3")
    dev = _compute_only(tflops=1.0)  # 1e12 FLOP/s for GEMM and attention
    n = 100
    h, q, kv, d, i, L, V = 256, 4, 2, 64, 512, 2, 2048
    gemm = 2 * n * (h * (q + 2 * kv) * d + q * d * h + h * 2 * i + i * h)
    elem = n * (8 * h + 4 * (q + kv) * d + 6 * (q + kv) * d + 5 * i + 2 * h)
    attn = 4 * q * d * n * (n + 1) / 2
    head = 2 * h * V
    expected = (L * (gemm + elem + attn) + head) / 1e12
    assert prefill_step_time(m, dev, np.array([n]), np.array([0]), 1) == pytest.approx(expected, rel=1e-9)


def test_decode_memory_bound_hand():
    m = load_model("qwen3-8b")
    dev = replace(load_device("h100-sxm"), decode_step_overhead_s=0.0, mem_eff=1.0)
    cost = decode_cost(m, dev, "bf16", max_batch=4)
    # batch 1: every GEMM is weight-read bound; attention reads S * 4096 B per layer
    bw = 3350e9
    gemm_w = 4096 * (32 + 16) * 128 + 32 * 128 * 4096 + 3 * 4096 * 12288
    assert cost.D == pytest.approx(36 * 4096 / bw, rel=1e-12)
    lower = (36 * gemm_w * 2 + 4096 * 151936 * 2) / bw
    assert lower < cost.C[1] < lower * 1.01  # + activations and norms, < 1 %
    # fp8 pool halves attention bytes (plus the bf16 scale): 2 * 8 * (128 + 2) per layer-token
    assert decode_cost(m, dev, "fp8_e4m3", max_batch=4).D == pytest.approx(36 * 2080 / bw, rel=1e-12)


def test_kv_capacity_hand():
    m = load_model("qwen3-8b")
    dev = load_device("h100-sxm")
    usable = 80e9 * 0.88 - m.weight_bytes_total - 2e9
    assert kv_capacity_tokens(m, dev, "bf16") == int(usable // (36 * 4096))
    assert kv_capacity_tokens(m, dev, "fp8_e4m3") == int(usable // (36 * 2080))
    # a model that does not fit leaves no KV room
    assert kv_capacity_tokens(load_model("qwen3-32b"), load_device("rtx4090"), "bf16") == 0


def test_bad_data_names_field():
    with pytest.raises(ValueError, match="mem_bw_gbps"):
        replace(load_device("l40s"), mem_bw_gbps=-1.0)
    with pytest.raises(ValueError, match="expected one of"):
        load_model("qwen3-9000b")
