"""The PD configurations the benchmarks compare, and the shaped-link rule they share.

Used by ``eval/bench_ttft.py`` (issue 5, TTFT per prompt length) and ``eval/goodput/`` (issue 7,
goodput on traces). Each configuration is the environment of the two SGLang servers of one
``PDCluster``; nothing else differs between them (same flags, same model, same link).

Link rule (issue 5): the ``tc tbf`` rate is set so that the bf16 KV of a ``ref_tokens`` prompt
(4096) takes as long to cross the prefill -> decode link as the prompt's prefill takes on this
machine. ``eval/results/ttft.json`` records the rate that rule gave (``link_rate``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTFT_JSON = os.path.join(ROOT, "eval", "results", "ttft.json")

# SmolLM2-135M: K+V, 30 layers, 3 KV heads, head_dim 64, 2 bytes.
BF16_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2
PAGE = 16
MAX_TOKENS = 20000  # --max-total-tokens of every server: the same token capacity for every format

# Per-layer sending for every prompt length (the shipped threshold, 256, was chosen from these runs).
_PIPELINED = {"MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": "0"}


@dataclass(frozen=True)
class PDConfig:
    """env: both servers; decode_env: the decode server only (on top of env)."""
    label: str
    env: dict[str, str] = field(default_factory=dict)
    decode_env: dict[str, str] = field(default_factory=dict)


PD_CONFIGS: dict[str, PDConfig] = {
    "pd_fp8_no_link": PDConfig("memha fp8 whole, KV over loopback (no shaped link)",
                               {"MEMHA_KV_FORMAT": "fp8_e4m3"}),
    "stock_bf16": PDConfig("stock SGLang PD (bf16 pools, whole request after the forward)"),
    "memha_fp8_whole": PDConfig("memha fp8_e4m3, whole request", {"MEMHA_KV_FORMAT": "fp8_e4m3"}),
    "memha_fp8_pipelined": PDConfig("memha fp8_e4m3, per-layer pipelined",
                                    {"MEMHA_KV_FORMAT": "fp8_e4m3", **_PIPELINED}),
    "memha_bf16_whole": PDConfig("memha bf16 pool, whole request", {"MEMHA_KV_FORMAT": "bf16"}),
    "memha_bf16_pipelined": PDConfig("memha bf16 pool, per-layer pipelined",
                                     {"MEMHA_KV_FORMAT": "bf16", **_PIPELINED}),
    "memha_int4_pipelined": PDConfig("memha int4_g64, per-layer pipelined",
                                     {"MEMHA_KV_FORMAT": "int4_g64", **_PIPELINED}),
    "memha_fp8_pipelined_eager": PDConfig("memha fp8 pipelined, eager dequant on decode (ablation)",
                                          {"MEMHA_KV_FORMAT": "fp8_e4m3", **_PIPELINED},
                                          {"MEMHA_DECODE_DEQUANT": "eager"}),
}


def server_args(max_len: int, compute_dtype: str = "model") -> list[str]:
    """Flags of both servers: page 16, chunked prefill larger than the longest prompt (one
    forward, then one send = "whole request"), and ``compute_args(compute_dtype)``."""
    return ["--page-size", str(PAGE), "--chunked-prefill-size", str(max(8192, max_len + 64)),
            *compute_args(compute_dtype)]


# Mooncake fails a synchronous batch transfer that takes over 30 s (its MC_TRANSFER_TIMEOUT, in
# seconds): a 4K prompt's whole bf16 KV (94 MB) on a link matched to a 30 s prefill takes ~30 s,
# so stock SGLang PD's whole-request send failed there ("Sync batch data transfer timeout after
# 30094372036ns"). Every configuration of a shaped-link bench gets the same longer limit.
SLOW_LINK_ENV = {"MC_TRANSFER_TIMEOUT": "300"}

COMPUTE_DTYPES = ("model", "float32")


def compute_args(dtype: str) -> list[str]:
    """Server flags for the benches' ``--compute-dtype``: ``model`` (the checkpoint's, bf16 for
    SmolLM2) adds none; ``float32`` computes in fp32 and keeps the KV cache in bf16
    (``--kv-cache-dtype bfloat16``; memha's pools read back into bf16), so every byte stored and
    sent is a bf16 model's. On a CPU without a bf16 GEMM path (AVX2 only) torch's bf16 matmuls
    are 13-90x slower than fp32 (SmolLM2 prefill of 1024 tokens: 30.0 s bf16, 6.3 s fp32), which
    made a 4K-prompt TTFT bench take hours; decode steps are not faster in fp32 (2x the weight
    bytes)."""
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute dtype {dtype!r}: expected one of {', '.join(COMPUTE_DTYPES)}")
    return [] if dtype == "model" else ["--dtype", "float32", "--kv-cache-dtype", "bfloat16"]


def thread_env(threads: int) -> dict[str, str]:
    """Torch threads of one server (0 = torch's default, one per core). On this 2-core box a
    prefill with 1 thread leaves the second core to Mooncake, whose TCP transport keeps a core
    busy while a transfer is in flight; a decode with torch's 2 threads next to a busy prefill
    loses its OpenMP barriers to descheduling (TPOT 0.3-1.0 s vs 0.09-0.16 s with 1 thread,
    measured side by side on a loaded box)."""
    return {"OMP_NUM_THREADS": str(threads)} if threads > 0 else {}



def matched_link_rate(prefill_s: float, ref_tokens: int = 4096) -> str:
    """tc rate at which bf16 KV of ``ref_tokens`` crosses in ``prefill_s`` (the issue-5 rule)."""
    if prefill_s <= 0:
        raise ValueError(f"prefill_s={prefill_s}: expected a positive prefill time")
    mbit = BF16_BYTES_PER_TOKEN * ref_tokens * 8 / prefill_s / 1e6
    return f"{max(1, round(mbit))}mbit"


def recorded_link_rate(path: str = TTFT_JSON) -> str:
    """The rate the issue-5 run chose (``link_rate`` in ttft.json)."""
    try:
        with open(path) as f:
            return json.load(f)["link_rate"]
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"no link_rate in {path} ({e}): run eval/bench_ttft.py or pass --rate") from None
