"""Calibrate the simulator on the CPU testbed and predict held-out measurements.

Calibration (``role: calibration`` rows of data/cpu_testbed.json):
  * prefill: t(n) = overhead + gemm_flops(n) / F_gemm + attn_flops(n) / F_attn, three unknowns
    solved exactly from single-server prefill at 256/1024/4096 tokens;
  * decode: step(B, S) = o_step + B * o_req + roofline(B; F_gemm, mem_bw) + S * D, three unknowns
    solved exactly from batch-1 @ ctx 32, batch-8 @ ctx 32, batch-1 @ ctx 4096;
  * PD hand-off overhead: from PD-on-loopback TTFT at 256 tokens.
PD runs also get a CPU-contention factor from measured CPU shares (both servers share 2 cores):
prefill compute rates are scaled by ``share_in_pd / share_alone``.

Every prediction runs a one-request replay through ``cluster.simulate``, so the event
simulation, transfer model and roofline are all exercised, not a closed form.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np

from .cluster import ClusterSpec, DecodeSpec, PrefillSpec, simulate
from .config import DATA_DIR, Device, ModelConfig, load_model
from .roofline import (decode_cost, elementwise_per_token, kv_bytes_per_token_model, lm_head_time,
                       prefill_attention_flops, prefill_step_time, _gemm_shapes)
from .transfer import Link


def testbed_table() -> dict:
    with open(DATA_DIR / "cpu_testbed.json") as f:
        return json.load(f)


def _base_device(tb: dict) -> Device:
    fields = {k: v for k, v in tb["device"].items() if k != "note"}
    return Device(name="cpu-testbed", **fields)


def _prefill_features(m: ModelConfig, n: int) -> tuple[float, float]:
    """(GEMM+elementwise+head FLOPs, attention FLOPs) of a single n-token prefill."""
    gemm = sum(2.0 * n * a * b for a, b in _gemm_shapes(m))
    ef, _ = elementwise_per_token(m, "bf16")
    lin = m.num_hidden_layers * (gemm + n * ef) + 2.0 * m.hidden_size * m.vocab_size
    attn = m.num_hidden_layers * prefill_attention_flops(m, np.array([n]), np.array([0]))
    return lin, attn


def fit_testbed() -> tuple[ModelConfig, Device, float]:
    """Return (model, calibrated device, PD hand-off seconds)."""
    tb = testbed_table()
    m = load_model(tb["model"])
    dev = _base_device(tb)
    cal = [r for r in tb["prefill"] if r["role"] == "calibration" and r["setup"] == "a"]
    A = np.array([[1.0, *_prefill_features(m, r["prompt"])] for r in cal])
    y = np.array([r["ttft_s"] for r in cal])
    o_p, inv_gemm, inv_attn = np.linalg.solve(A, y)
    if min(o_p, inv_gemm, inv_attn) < 0:
        raise ValueError(f"prefill fit is unphysical: overhead={o_p}, 1/F_gemm={inv_gemm}, 1/F_attn={inv_attn}")
    dev = replace(dev, bf16_tflops=1e-12 / inv_gemm, prefill_step_overhead_s=float(o_p),
                  attn_tflops=1e-12 / inv_attn)
    # decode: step = o_step + B*o_req + C0[B] + S*D, C0 from the roofline with zero overheads
    dcal = [r for r in tb["decode"] if r["role"] == "calibration"]
    zero = replace(dev, decode_step_overhead_s=0.0, decode_per_request_overhead_s=0.0)
    C0 = decode_cost(m, zero, "bf16").C
    A = np.array([[1.0, r["batch"], r["batch"] * (r["prompt"] + 1 + (r["tokens"] - 1) / 2)] for r in dcal])
    y = np.array([r["tpot_s"] - C0[r["batch"]] for r in dcal])
    o_d, o_r, D = np.linalg.solve(A, y)
    if min(o_d, o_r, D) < 0:
        raise ValueError(f"decode fit is unphysical: o_step={o_d}, o_req={o_r}, D={D}")
    f_attn_dec = m.num_hidden_layers * 4.0 * m.num_attention_heads * m.head_dim / D
    top = max(f_attn_dec, dev.attn_tflops * 1e12)
    dev = replace(dev, decode_step_overhead_s=float(o_d), decode_per_request_overhead_s=float(o_r),
                  attn_tflops=top / 1e12, attn_prefill_eff=dev.attn_tflops * 1e12 / top,
                  attn_decode_eff=f_attn_dec / top)
    # PD hand-off overhead from (b) at its calibration prompt length
    bcal = [r for r in tb["prefill"] if r["role"] == "calibration" and r["setup"] == "b"]
    handoff = 0.0
    if bcal:
        r = bcal[0]
        pred = _replay_ttft(m, dev, "b", r["prompt"], 0.0, tb)
        handoff = r["ttft_s"] - pred
        if handoff < 0:
            raise ValueError(f"PD hand-off fit is negative ({handoff:.3f} s)")
    return m, dev, float(handoff)


def _cluster(m: ModelConfig, dev: Device, setup: str, handoff: float, tb: dict) -> ClusterSpec:
    share = tb["cpu_share"]
    if setup == "a":
        factor, gbps, hand = 1.0, 1e6, 0.0  # single server: no transfer, no hand-off
    else:
        factor = share["prefill_alone"] / share["prefill_pd_loopback" if setup == "b" else "prefill_pd_shaped"]
        gbps = tb["links"]["loopback_gbps" if setup == "b" else "shaped_gbps"]
        hand = handoff
    pdev = replace(dev, bf16_tflops=dev.bf16_tflops / factor, attn_tflops=dev.attn_tflops / factor)

    def step(new: np.ndarray, cached: np.ndarray, n_fin: int) -> float:
        return prefill_step_time(m, pdev, new, cached, n_fin, "bf16")

    pool = tb["pool_tokens"]
    p = PrefillSpec(step_time=step, n_layers=m.num_hidden_layers, capacity_tokens=pool,
                    chunk_tokens=dev.chunked_prefill_size, link=Link(gbps=gbps),
                    wire_bytes_per_token=kv_bytes_per_token_model(m, "bf16"))
    d = DecodeSpec(cost=decode_cost(m, dev, "bf16"), capacity_tokens=pool, max_batch=dev.max_running_requests)
    return ClusterSpec(prefill=(p,), decode=(d,), pipelined=False, handoff_s=hand)


def _replay_ttft(m: ModelConfig, dev: Device, setup: str, prompt: int, handoff: float, tb: dict) -> float:
    r = simulate(_cluster(m, dev, setup, handoff, tb), np.zeros(1), np.array([prompt]), np.array([1]))
    return float(r.ttft[0])


def _replay_tpot(m: ModelConfig, dev: Device, setup: str, batch: int, prompt: int, tokens: int,
                 handoff: float, tb: dict) -> float:
    # batch requests arriving together; they prefill in one batch and decode together
    r = simulate(_cluster(m, dev, setup, handoff, tb), np.zeros(batch), np.full(batch, prompt),
                 np.full(batch, tokens))
    return float(np.nanmedian(r.tpot))


def run() -> dict:
    """Fit, predict every row, and return a flat dict of results (also per-row errors)."""
    tb = testbed_table()
    m, dev, handoff = fit_testbed()
    rows = []
    for r in tb["prefill"]:
        pred = _replay_ttft(m, dev, r["setup"], r["prompt"], handoff, tb)
        rows.append({"metric": "ttft", "setup": r["setup"], "prompt": r["prompt"], "batch": 1,
                     "measured_s": r["ttft_s"], "predicted_s": pred, "role": r["role"], "source": r["source"]})
    for r in tb["decode"]:
        pred = _replay_tpot(m, dev, r["setup"], r["batch"], r["prompt"], r["tokens"], handoff, tb)
        rows.append({"metric": "tpot", "setup": r["setup"], "prompt": r["prompt"], "batch": r["batch"],
                     "measured_s": r["tpot_s"], "predicted_s": pred, "role": r["role"], "source": r["source"]})
    for row in rows:
        row["rel_error"] = abs(row["predicted_s"] - row["measured_s"]) / row["measured_s"]
    held = [x for x in rows if x["role"] == "validation"]
    pd_held = [x for x in held if x["setup"] in ("b", "c")]
    return {
        "rows": rows,
        "fit": {"gemm_gflops": dev.bf16_tflops * 1e3, "attn_prefill_gflops": dev.attn_prefill_flops / 1e9,
                "attn_decode_gflops": dev.attn_decode_flops / 1e9, "prefill_overhead_s": dev.prefill_step_overhead_s,
                "decode_step_overhead_s": dev.decode_step_overhead_s,
                "decode_per_request_overhead_s": dev.decode_per_request_overhead_s, "pd_handoff_s": handoff},
        "sim_max_rel_error": max(x["rel_error"] for x in held),
        "sim_max_rel_error_pd": max(x["rel_error"] for x in pd_held),
        "sim_max_rel_error_ttft": max(x["rel_error"] for x in held if x["metric"] == "ttft"),
        "sim_max_rel_error_tpot": max(x["rel_error"] for x in held if x["metric"] == "tpot"),
        "sim_calibration_max_rel_error": max(x["rel_error"] for x in rows if x["role"] == "calibration"),
        "sim_validation_points": len(held),
        "sim_validation_within_15pct": sum(x["rel_error"] <= 0.15 for x in held),
    }
