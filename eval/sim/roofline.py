"""Per-layer roofline of one prefill batch and one decode step.

Each operator of a decoder layer costs ``max(flops / flop_rate, bytes / mem_bw)`` on a device;
a layer is the sum of its operators and a step is ``num_layers * layer + lm_head + overhead``.
Operators (per layer, N tokens in the batch, h hidden, q/kv heads, d head_dim, I intermediate):

    gemm   qkv_proj  2*N*h*(q+2kv)*d   weights h*(q+2kv)*d          (+ activations in/out)
    gemm   o_proj    2*N*q*d*h         weights q*d*h
    gemm   gate_up   2*N*h*2I          weights 2*h*I
    gemm   down      2*N*I*h           weights I*h
    elem   norms, qk-norm, rope, SiLU*mul, KV write (+ quantize when the KV format is not bf16)
    attn   prefill   4*q*d*sum_i(n_i*c_i + n_i*(n_i+1)/2)  (causal; c_i cached prefix, n_i new)
           decode    4*q*d*S (+ dequant flops), bytes S * kv_bytes_per_token(pool format)

Every GEMM and attention call also costs ``kernel_latency_s`` (0 unless a GPU calibration measured it).
Decode attention is linear in S (total KV tokens of the batch), so one decode step is
``C(B) + D * S`` exactly (B = batch size); ``DecodeCost`` precomputes C for every B.
KV bytes per token come from the project's format module (``sglang_memha.kvformat``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sglang_memha.kvformat import kv_bytes_per_token

from .config import Device, ModelConfig

ACT_BYTES = 2  # bf16 activations


def kv_bytes_per_token_layer(model: ModelConfig, fmt: str) -> int:
    """K+V bytes of one token in ONE layer, scales included (from the format module)."""
    return int(kv_bytes_per_token(fmt, model.num_key_value_heads, model.head_dim))


def kv_bytes_per_token_model(model: ModelConfig, fmt: str) -> int:
    """K+V bytes of one token over all layers."""
    return model.num_hidden_layers * kv_bytes_per_token_layer(model, fmt)


def _gemm_shapes(m: ModelConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of the four GEMMs of one layer."""
    h, q, kv, d, i = m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim, m.intermediate_size
    return [(h, (q + 2 * kv) * d), (q * d, h), (h, 2 * i), (i, h)]


def gemm_time(m: ModelConfig, dev: Device, n_tokens: np.ndarray | float) -> np.ndarray | float:
    """Time of the four GEMMs of ONE layer for n_tokens rows (vectorised over n_tokens)."""
    n = np.asarray(n_tokens, dtype=np.float64)
    t = np.zeros_like(n)
    for k_in, k_out in _gemm_shapes(m):
        flops = 2.0 * n * k_in * k_out
        byts = k_in * k_out * m.weight_bytes + n * (k_in + k_out) * ACT_BYTES
        t = t + np.maximum(flops / dev.gemm_flops, byts / dev.mem_bw) + dev.kernel_latency_s
    return t if t.ndim else float(t)


def elementwise_per_token(m: ModelConfig, kv_fmt: str) -> tuple[float, float]:
    """(flops, bytes) per token of ONE layer for norms, qk-norm, rope, SiLU*mul and the KV write."""
    h, q, kv, d, i = m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim, m.intermediate_size
    flops = 2 * 4 * h                          # two RMSNorms
    byts = 2 * 2 * h * ACT_BYTES               # read + write each
    if m.qk_norm:
        flops += 4 * (q + kv) * d
        byts += 2 * (q + kv) * d * ACT_BYTES
    flops += 6 * (q + kv) * d                  # rope
    byts += 2 * (q + kv) * d * ACT_BYTES
    flops += 5 * i                             # SiLU(gate) * up
    byts += 3 * i * ACT_BYTES
    flops += 2 * h                             # two residual adds
    byts += 2 * 3 * h * ACT_BYTES
    byts += kv_bytes_per_token_layer(m, kv_fmt)  # KV write
    if kv_fmt != "bf16":                       # quantize: read bf16 K/V, compute scales
        flops += 2 * kv * d * 4.0
        byts += 2 * kv * d * ACT_BYTES
    return float(flops), float(byts)


def lm_head_time(m: ModelConfig, dev: Device, n_rows: float) -> float:
    """Final norm + LM head for n_rows tokens (prefill: one per finishing request)."""
    if n_rows <= 0:
        return 0.0
    flops = 2.0 * n_rows * m.hidden_size * m.vocab_size
    byts = m.hidden_size * m.vocab_size * m.weight_bytes + n_rows * (m.hidden_size + m.vocab_size) * ACT_BYTES
    return max(flops / dev.gemm_flops, byts / dev.mem_bw)


def prefill_attention_flops(m: ModelConfig, new: np.ndarray, cached: np.ndarray) -> float:
    """Causal attention FLOPs of ONE layer: 4*q*d*sum(n*c + n*(n+1)/2)."""
    n = np.asarray(new, dtype=np.float64)
    c = np.asarray(cached, dtype=np.float64)
    return float(4.0 * m.num_attention_heads * m.head_dim * np.sum(n * c + n * (n + 1) / 2))


def prefill_attention_time(m: ModelConfig, dev: Device, new: np.ndarray, cached: np.ndarray,
                           kv_fmt: str = "bf16") -> float:
    """Causal attention of ONE layer over a prefill batch (chunk i: new[i] tokens after cached[i])."""
    new = np.asarray(new, dtype=np.float64)
    cached = np.asarray(cached, dtype=np.float64)
    a_flops = prefill_attention_flops(m, new, cached)
    kvb = kv_bytes_per_token_layer(m, kv_fmt)
    a_bytes = float(cached.sum()) * kvb + float(new.sum()) * 2 * m.num_attention_heads * m.head_dim * ACT_BYTES
    return max(a_flops / dev.attn_prefill_flops, a_bytes / dev.mem_bw) + dev.kernel_latency_s


def decode_attention_time_per_token(m: ModelConfig, dev: Device, pool_fmt: str = "bf16") -> float:
    """Seconds per KV token of ONE layer's decode attention on a ``pool_fmt`` pool (dequant inside)."""
    a_flops = 4.0 * m.num_attention_heads * m.head_dim
    if pool_fmt != "bf16":
        a_flops += dev.kv_quant_flops_per_elem * 2 * m.num_key_value_heads * m.head_dim
    return max(a_flops / dev.attn_decode_flops, kv_bytes_per_token_layer(m, pool_fmt) / dev.mem_bw)


def prefill_step_time(m: ModelConfig, dev: Device, new: np.ndarray, cached: np.ndarray,
                      n_finishing: int, kv_fmt: str = "bf16") -> float:
    """Seconds for one prefill batch: chunk i adds new[i] tokens after cached[i] already in the pool.

    ``kv_fmt`` is the format the prefill pool (and wire) keeps; cached-prefix reads are in it.
    ``n_finishing`` requests complete their prompt in this batch and need one LM-head row each.
    """
    new = np.asarray(new, dtype=np.float64)
    cached = np.asarray(cached, dtype=np.float64)
    n_tok = float(new.sum())
    if n_tok <= 0:
        raise ValueError(f"prefill batch has {n_tok} new tokens: expected > 0")
    ef, eb = elementwise_per_token(m, kv_fmt)
    elem = max(n_tok * ef / dev.gemm_flops, n_tok * eb / dev.mem_bw)
    layer = gemm_time(m, dev, n_tok) + elem + prefill_attention_time(m, dev, new, cached, kv_fmt)
    return m.num_hidden_layers * layer + lm_head_time(m, dev, n_finishing) + dev.prefill_step_overhead_s


@dataclass(frozen=True)
class DecodeCost:
    """One decode step costs ``C[B] + D * S`` seconds (B running requests, S KV tokens in the batch)."""

    C: np.ndarray  # [max_batch + 1] float64, seconds; C[0] is unused
    D: float  # seconds per KV token in the batch

    def step_time(self, batch: int, kv_tokens: float) -> float:
        return float(self.C[batch] + self.D * kv_tokens)


def decode_cost(m: ModelConfig, dev: Device, pool_fmt: str = "bf16", max_batch: int | None = None) -> DecodeCost:
    """Decode step coefficients for a pool storing KV in ``pool_fmt`` (dequantized inside attention)."""
    bmax = int(max_batch or dev.max_running_requests)
    b = np.arange(bmax + 1, dtype=np.float64)
    L = m.num_hidden_layers
    ef, eb = elementwise_per_token(m, pool_fmt)
    elem = np.maximum(b * ef / dev.gemm_flops, b * eb / dev.mem_bw)
    q_io = b * 2 * m.num_attention_heads * m.head_dim * ACT_BYTES / dev.mem_bw  # q in, o out
    head = np.array([lm_head_time(m, dev, x) for x in b])
    C = L * (gemm_time(m, dev, b) + elem + q_io + dev.kernel_latency_s) + head + dev.decode_step_overhead_s \
        + b * dev.decode_per_request_overhead_s
    D = L * decode_attention_time_per_token(m, dev, pool_fmt)
    return DecodeCost(C=C, D=float(D))
