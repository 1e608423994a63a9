"""Calibrate the simulator on the CPU testbed and predict held-out measurements.

Two sources of measurements (``run(source=...)``):

* ``harness`` (the default when ``eval/results/cpu_pd_measured.json`` exists): the project's own
  per-request runs, made in one session by ``eval/measure_cpu_pd.py`` with
  ``sglang_memha.testing.SingleServer`` / ``PDCluster`` (setup a: single server; b: PD on
  loopback through the router). ``harness_table()`` turns that file into a testbed table; which
  points are fitted is fixed by ``HARNESS_CALIBRATION``, every other point is held out:
    - prefill: a@256/1024/2048 fit overhead, 1/F_gemm, 1/F_attn (exact solve);
    - decode (batch 1 only): a@256 and a@2048 fit step overhead + per-token attention cost
      (the per-request overhead is not separable at batch 1 and is set to 0);
    - PD: b@256 and b@2048 fit the hand-off seconds and the PD prefill slowdown factor
      (a one-dimensional root find; the measured CPU shares are reported beside it, not used).
* ``reference`` (the older validation, ``data/cpu_testbed.json``): medians copied from the
  reference sessions in ``shared/reference/``, described below.

Reference calibration (``role: calibration`` rows of data/cpu_testbed.json):
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
from pathlib import Path
from typing import Callable

import numpy as np

from .cluster import ClusterSpec, DecodeSpec, PrefillSpec, simulate
from .config import DATA_DIR, Device, ModelConfig, load_model
from .roofline import (decode_cost, elementwise_per_token, kv_bytes_per_token_model, lm_head_time,
                       prefill_attention_flops, prefill_step_time, _gemm_shapes)
from .transfer import Link


HARNESS_FILE = Path(__file__).resolve().parents[2] / "eval" / "results" / "cpu_pd_measured.json"
# (metric, setup, prompt) of the harness points that are fitted; every other point is held out
HARNESS_CALIBRATION = {("ttft", "a", 256), ("ttft", "a", 1024), ("ttft", "a", 2048),
                       ("tpot", "a", 256), ("tpot", "a", 2048),
                       ("ttft", "b", 256), ("ttft", "b", 2048)}


def testbed_table() -> dict:
    with open(DATA_DIR / "cpu_testbed.json") as f:
        return json.load(f)


def harness_table(path: Path = HARNESS_FILE) -> dict:
    """Testbed table (same shape as data/cpu_testbed.json) from ``eval/measure_cpu_pd.py`` output.

    Each point's value is the file's ``median_used_s`` (median of the quiet runs, or of all runs
    when fewer than 3 were quiet). Device constants, links and the CPU-share fallback come from
    data/cpu_testbed.json; the pool is the runs' ``--max-total-tokens``.
    """
    with open(path) as f:
        meas = json.load(f)
    ref = testbed_table()
    src = f"{path.name} ({meas['date']}, commit {meas['git_commit'][:10]})"
    dev = dict(ref["device"], chunked_prefill_size=4096)
    tb = {"model": meas["model"], "device": dev, "pool_tokens": meas["server_flags"]["max_total_tokens"],
          "cpu_share": ref["cpu_share"], "links": ref["links"], "prefill": [], "decode": [],
          "measured_cpu_share": {}}

    def role(metric: str, setup: str, prompt: int) -> str:
        return "calibration" if (metric, setup, prompt) in HARNESS_CALIBRATION else "validation"

    for setup in ("a", "b"):
        for n, pt in sorted(meas[setup]["ttft"].items(), key=lambda kv: int(kv[0])):
            tb["prefill"].append({"setup": setup, "prompt": int(n), "ttft_s": pt["median_used_s"],
                                  "role": role("ttft", setup, int(n)), "source": src,
                                  "runs": len([r for r in pt["runs"] if not r["warmup"]]),
                                  "quiet_runs": pt["quiet_runs"]})
        for n, pt in sorted(meas[setup]["tpot"].items(), key=lambda kv: int(kv[0])):
            tb["decode"].append({"setup": setup, "batch": 1, "prompt": int(n), "tokens": meas["tpot_tokens"],
                                 "tpot_s": pt["median_used_s"], "role": role("tpot", setup, int(n)),
                                 "source": src, "runs": len([r for r in pt["runs"] if not r["warmup"]]),
                                 "quiet_runs": pt["quiet_runs"]})
        # cores used by the server doing prefill during the longest TTFT runs (reported only)
        longest = max(meas[setup]["ttft"], key=int)
        key = "server" if setup == "a" else "prefill"
        runs = [r for r in meas[setup]["ttft"][longest]["runs"] if not r["warmup"]]
        tb["measured_cpu_share"][setup] = float(np.median([r["cpu_cores"][key] for r in runs]))
    return tb


def load_table(source: str = "auto", harness_file: Path | None = None) -> dict:
    """``harness`` | ``reference`` | ``auto`` (harness when its file exists)."""
    harness_file = Path(harness_file or HARNESS_FILE)
    if source == "auto":
        source = "harness" if harness_file.exists() else "reference"
    if source == "harness":
        tb = harness_table(harness_file)
    elif source == "reference":
        tb = testbed_table()
    else:
        raise ValueError(f"source={source!r}: expected 'harness', 'reference' or 'auto'")
    tb["source_kind"] = source
    return tb


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


def _lstsq_nonneg(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares; unknowns that come out negative are fixed at 0 and the rest refitted
    (a tiny negative overhead is noise, an unphysical rate still fails in the caller)."""
    free = np.ones(A.shape[1], dtype=bool)
    while True:
        x = np.zeros(A.shape[1])
        x[free] = np.linalg.lstsq(A[:, free], y, rcond=None)[0]
        if x.min() >= 0 or free.sum() <= 1:
            return x
        free &= x > 0


def fit_prefill(m: ModelConfig, dev: Device, cal: list[dict], tb: dict,
                attn_ratio: float | None = None) -> Device:
    """``dev`` with the prefill overhead, 1/F_gemm and 1/F_attn fitted on single-server (setup a)
    TTFT rows ``cal`` (``prompt``, ``ttft_s``): exact with 3 rows, least squares with more; an
    unknown that would come out negative is held at 0 (then the rows are fitted, not exact).

    With fewer than 3 rows pass ``attn_ratio`` = F_gemm / F_attn (taken from elsewhere): the
    unknowns are then the overhead and 1/F_gemm, and 1/F_attn = attn_ratio / F_gemm.
    """
    if len(cal) < (3 if attn_ratio is None else 2):
        raise ValueError(f"{len(cal)} prefill calibration rows: 3 unknowns need 3 (2 with attn_ratio)")
    if attn_ratio is not None and not attn_ratio > 0:
        raise ValueError(f"attn_ratio={attn_ratio!r}: expected F_gemm / F_attn > 0")
    feats = [(1.0, *_prefill_features(m, r["prompt"])) for r in cal]
    A = np.array(feats if attn_ratio is None else [(o, g + attn_ratio * a) for o, g, a in feats])
    y = np.array([r["ttft_s"] for r in cal])

    def prefill_device(params: np.ndarray) -> Device:
        o_p, inv_gemm = params[:2]
        inv_attn = params[2] if attn_ratio is None else attn_ratio * inv_gemm
        if min(o_p, inv_gemm, inv_attn) < 0:
            raise ValueError(f"prefill fit is unphysical: overhead={o_p}, 1/F_gemm={inv_gemm}, 1/F_attn={inv_attn}")
        return replace(dev, bf16_tflops=1e-12 / inv_gemm, prefill_step_overhead_s=float(o_p),
                       attn_tflops=1e-12 / inv_attn)

    # The simulator prices each operator max(FLOPs / rate, bytes / mem_bw); the linear fit sees
    # only FLOPs. Fixed point: refit the FLOP model on the measurements minus what the roofline's
    # memory terms add at the current rates, so the replayed calibration points come out exact.
    params = _lstsq_nonneg(A, y)
    for _ in range(50):
        pred = np.array([replay_ttft(m, prefill_device(params), "a", r["prompt"], 0.0, tb) for r in cal])
        if np.max(np.abs(pred / y - 1)) < 1e-4:
            break
        params = _lstsq_nonneg(A, y - (pred - A @ params))
    return prefill_device(params)


def fit_pd(m: ModelConfig, dev: Device, bcal: list[dict], tb: dict, setup: str = "b",
           **cluster_kw) -> tuple[float, float | None]:
    """(PD hand-off seconds, PD prefill slowdown or None) from PD TTFT rows ``bcal`` of ``setup``.

    One row: the hand-off only. Two: both, exactly (a root find; predicted TTFT grows with the
    slowdown). More: the shortest and the longest prompt's rows are solved exactly, the rest are
    not used. ``cluster_kw`` goes to ``testbed_cluster`` (link, KV format).
    """
    bcal = sorted(bcal, key=lambda r: r["prompt"])
    handoff, slowdown = 0.0, None
    if len(bcal) == 1:
        r = bcal[0]
        handoff = r["ttft_s"] - replay_ttft(m, dev, setup, r["prompt"], 0.0, tb, **cluster_kw)
    elif len(bcal) >= 2:
        lo, hi = bcal[0], bcal[-1]

        def resid(f: float) -> tuple[float, float]:
            h = lo["ttft_s"] - replay_ttft(m, dev, setup, lo["prompt"], 0.0, tb, f, **cluster_kw)
            return replay_ttft(m, dev, setup, hi["prompt"], h, tb, f, **cluster_kw) - hi["ttft_s"], h

        a, b = 0.25, 8.0
        if resid(a)[0] > 0 or resid(b)[0] < 0:
            raise ValueError(f"PD slowdown fit has no root in [{a}, {b}]")
        for _ in range(60):  # bisection: predicted TTFT grows with the slowdown
            mid = 0.5 * (a + b)
            a, b = (mid, b) if resid(mid)[0] < 0 else (a, mid)
        slowdown = 0.5 * (a + b)
        handoff = resid(slowdown)[1]
    if handoff < 0:
        raise ValueError(f"PD hand-off fit is negative ({handoff:.3f} s)")
    return float(handoff), slowdown


def fit_testbed(tb: dict | None = None) -> tuple[ModelConfig, Device, float, float | None]:
    """Return (model, calibrated device, PD hand-off seconds, fitted PD slowdown or None).

    The PD prefill slowdown is fitted when the table has two PD loopback (b) calibration
    prefills; otherwise (reference table) it comes from the measured CPU shares.
    """
    tb = tb or testbed_table()
    m = load_model(tb["model"])
    cal = [r for r in tb["prefill"] if r["role"] == "calibration" and r["setup"] == "a"]
    dev = fit_prefill(m, _base_device(tb), cal, tb)
    # decode: step = o_step + B*o_req + C0[B] + S*D, C0 from the roofline with zero overheads
    dcal = [r for r in tb["decode"] if r["role"] == "calibration" and r["setup"] == "a"]
    zero = replace(dev, decode_step_overhead_s=0.0, decode_per_request_overhead_s=0.0)
    C0 = decode_cost(m, zero, "bf16").C
    ctx = [r["batch"] * (r["prompt"] + 1 + (r["tokens"] - 1) / 2) for r in dcal]
    y = np.array([r["tpot_s"] - C0[r["batch"]] for r in dcal])
    if len({r["batch"] for r in dcal}) > 1:
        A = np.array([[1.0, r["batch"], c] for r, c in zip(dcal, ctx)])
        o_d, o_r, D = np.linalg.lstsq(A, y, rcond=None)[0]
    else:  # batch 1 only: per-request overhead is not separable from the step overhead
        A = np.array([[1.0, c] for c in ctx])
        (o_d, D), o_r = np.linalg.lstsq(A, y, rcond=None)[0], 0.0
    if min(o_d, o_r, D) < 0:
        raise ValueError(f"decode fit is unphysical: o_step={o_d}, o_req={o_r}, D={D}")
    f_attn_dec = m.num_hidden_layers * 4.0 * m.num_attention_heads * m.head_dim / D
    top = max(f_attn_dec, dev.attn_tflops * 1e12)
    dev = replace(dev, decode_step_overhead_s=float(o_d), decode_per_request_overhead_s=float(o_r),
                  attn_tflops=top / 1e12, attn_prefill_eff=dev.attn_tflops * 1e12 / top,
                  attn_decode_eff=f_attn_dec / top)
    # PD hand-off overhead (and slowdown, with two points) from (b) calibration prefills
    bcal = [r for r in tb["prefill"] if r["role"] == "calibration" and r["setup"] == "b"]
    if len(bcal) > 2:
        raise ValueError(f"{len(bcal)} PD calibration prefills: expected 1 or 2")
    handoff, slowdown = fit_pd(m, dev, bcal, tb)
    return m, dev, handoff, slowdown


def testbed_cluster(m: ModelConfig, dev: Device, setup: str, handoff: float, tb: dict,
                    slowdown: float | None = None, link: Link | None = None, kv_fmt: str = "bf16",
                    pipelined: bool = False) -> ClusterSpec:
    """One prefill + one decode instance of the CPU testbed. ``setup`` a: single server (no
    transfer, no hand-off); b: PD on loopback; c: PD on the shaped link of ``tb["links"]``.
    ``link`` replaces the link of b/c; ``kv_fmt`` is the prefill pool's and the wire's format;
    ``pipelined`` sends per layer."""
    share = tb["cpu_share"]
    if setup == "a":
        factor, gbps, hand = 1.0, 1e6, 0.0  # single server: no transfer, no hand-off
    else:
        factor = slowdown if slowdown is not None else (
            share["prefill_alone"] / share["prefill_pd_loopback" if setup == "b" else "prefill_pd_shaped"])
        gbps = tb["links"]["loopback_gbps" if setup == "b" else "shaped_gbps"]
        hand = handoff
    if setup == "a" or link is None:
        link = Link(gbps=gbps)
    pdev = replace(dev, bf16_tflops=dev.bf16_tflops / factor, attn_tflops=dev.attn_tflops / factor)

    def step(new: np.ndarray, cached: np.ndarray, n_fin: int) -> float:
        return prefill_step_time(m, pdev, new, cached, n_fin, kv_fmt)

    pool = tb["pool_tokens"]
    p = PrefillSpec(step_time=step, n_layers=m.num_hidden_layers, capacity_tokens=pool,
                    chunk_tokens=min(dev.chunked_prefill_size, pool), link=link,
                    wire_bytes_per_token=kv_bytes_per_token_model(m, kv_fmt))
    d = DecodeSpec(cost=decode_cost(m, dev, "bf16"), capacity_tokens=pool, max_batch=dev.max_running_requests)
    return ClusterSpec(prefill=(p,), decode=(d,), pipelined=pipelined, handoff_s=hand)


def replay_ttft(m: ModelConfig, dev: Device | Callable[[int], Device], setup: str, prompt: int, handoff: float,
                tb: dict, slowdown: float | None = None, **cluster_kw) -> float:
    """TTFT of one ``prompt``-token request replayed through ``cluster.simulate``. ``dev`` is a
    device or a function of the prompt length returning one (``kernel_rates.KernelPrefill.device``:
    rates measured at that length)."""
    spec = testbed_cluster(m, dev(prompt) if callable(dev) else dev, setup, handoff, tb, slowdown, **cluster_kw)
    return float(simulate(spec, np.zeros(1), np.array([prompt]), np.array([1])).ttft[0])


def _replay_tpot(m: ModelConfig, dev: Device, setup: str, batch: int, prompt: int, tokens: int,
                 handoff: float, tb: dict, slowdown: float | None = None) -> float:
    # batch requests arriving together; they prefill in one batch and decode together
    r = simulate(testbed_cluster(m, dev, setup, handoff, tb, slowdown), np.zeros(batch), np.full(batch, prompt),
                 np.full(batch, tokens))
    return float(np.nanmedian(r.tpot))


def run(source: str = "auto", harness_file: Path | None = None) -> dict:
    """Fit, predict every row, and return a flat dict of results (also per-row errors).

    source: ``harness`` (eval/results/cpu_pd_measured.json), ``reference``
    (data/cpu_testbed.json, the older validation) or ``auto`` (harness when its file exists).
    """
    tb = load_table(source, harness_file)
    m, dev, handoff, slowdown = fit_testbed(tb)
    rows = []
    for r in tb["prefill"]:
        pred = replay_ttft(m, dev, r["setup"], r["prompt"], handoff, tb, slowdown)
        rows.append({"metric": "ttft", "setup": r["setup"], "prompt": r["prompt"], "batch": 1,
                     "measured_s": r["ttft_s"], "predicted_s": pred, "role": r["role"], "source": r["source"]})
    for r in tb["decode"]:
        pred = _replay_tpot(m, dev, r["setup"], r["batch"], r["prompt"], r["tokens"], handoff, tb, slowdown)
        rows.append({"metric": "tpot", "setup": r["setup"], "prompt": r["prompt"], "batch": r["batch"],
                     "measured_s": r["tpot_s"], "predicted_s": pred, "role": r["role"], "source": r["source"]})
    for row in rows:
        row["rel_error"] = abs(row["predicted_s"] - row["measured_s"]) / row["measured_s"]
    held = [x for x in rows if x["role"] == "validation"]
    pd_held = [x for x in held if x["setup"] in ("b", "c")]
    shares = tb.get("measured_cpu_share")
    return {
        "source": tb["source_kind"],
        "rows": rows,
        "fit": {"gemm_gflops": dev.bf16_tflops * 1e3, "attn_prefill_gflops": dev.attn_prefill_flops / 1e9,
                "attn_decode_gflops": dev.attn_decode_flops / 1e9, "prefill_overhead_s": dev.prefill_step_overhead_s,
                "decode_step_overhead_s": dev.decode_step_overhead_s,
                "decode_per_request_overhead_s": dev.decode_per_request_overhead_s, "pd_handoff_s": handoff,
                "pd_prefill_slowdown": slowdown,
                "pd_prefill_slowdown_from_cpu_share": (shares["a"] / shares["b"]) if shares else None,
                "measured_cpu_share": shares},
        "sim_max_rel_error": max(x["rel_error"] for x in held),
        "sim_validation_source": tb["source_kind"],
        "sim_max_rel_error_pd": max(x["rel_error"] for x in pd_held),
        "sim_max_rel_error_ttft": max(x["rel_error"] for x in held if x["metric"] == "ttft"),
        "sim_max_rel_error_tpot": max(x["rel_error"] for x in held if x["metric"] == "tpot"),
        "sim_calibration_max_rel_error": max(x["rel_error"] for x in rows if x["role"] == "calibration"),
        "sim_validation_points": len(held),
        "sim_validation_within_15pct": sum(x["rel_error"] <= 0.15 for x in held),
    }
