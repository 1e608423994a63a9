"""How long a goodput run will take, printed before it starts.

The estimate replays the rate search (``metrics.next_rate``) against a latency model taken from
the issue-5 measurements on the same link (``eval/results/ttft.json``: unloaded TTFT per prompt
length for stock and memha configurations; configurations it lacks use memha fp8 pipelined's).
Assumed: a configuration's goodput is ``GOODPUT_FRACTION`` of ``1 / mean unloaded TTFT`` over the
window; a passing run lasts its arrival span plus one request; a missing run stops about one
TTFT SLO after the allowed misses have arrived; a cluster start costs ``STARTUP_S``.
It is a rough guide (the box is shared, the goodput is what is being measured).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from eval.goodput.metrics import allowed_misses, next_rate
from eval.goodput.workload import Workload
from eval.pd_configs import TTFT_JSON

STARTUP_S = 75.0  # PD cluster start on the shaped link incl. readiness (60-85 s measured on this box)
SETTLE_S = 4.0
WARMUP_S = 8.0
TPOT_S = 0.08  # unloaded decode step, SmolLM2 on 2 cores (ctx <= 2K)
GOODPUT_FRACTION = 0.8
_FALLBACK = {"stock_bf16": (0.6, 6.0e-3), "memha_fp8_whole": (0.5, 4.3e-3), "memha_fp8_pipelined": (0.3, 3.0e-3)}
_COLUMN = {"stock_bf16": "stock_bf16", "memha_fp8_whole": "memha_fp8_whole"}


@dataclass(frozen=True)
class Settings:
    k_ttft: float
    k_tpot: float
    start_factor: float
    step: float
    resolution: float
    span: float
    max_runs: int
    calibration_reps: int
    target: float


class TTFTModel:
    """Unloaded PD TTFT (s) per prompt length and configuration, from ttft.json."""

    def __init__(self, path: str = TTFT_JSON):
        self.curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        data = {}
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
        for col in ("stock_bf16", "memha_fp8_whole", "memha_fp8_pipelined"):
            pts = sorted((int(k.rsplit("_", 1)[1]), v) for k, v in data.items()
                         if k.startswith(f"ttft_s_{col}_") and k.rsplit("_", 1)[1].isdigit())
            if pts:
                xs, ys = zip(*pts)
                self.curves[col] = (np.array((0, *xs), float), np.array((0.15, *ys), float))
            else:
                a, b = _FALLBACK[col]
                self.curves[col] = (np.array([0.0, 8192.0]), np.array([a, a + b * 8192]))

    def ttft(self, config: str, lengths: np.ndarray) -> np.ndarray:
        xs, ys = self.curves[_COLUMN.get(config, "memha_fp8_pipelined")]
        return np.interp(lengths, xs, ys)

    def capacity(self, config: str, lengths: np.ndarray) -> float:
        return 1.0 / float(np.mean(self.ttft(config, lengths)))


def estimate_config(wl: Workload, config: str, start: float, ttft_slo: float, model: TTFTModel,
                    s: Settings, calibrate: bool) -> float:
    """Seconds for one configuration on one workload (start-up, warm-up, calibration, sweep)."""
    n, out_mean = len(wl), float(np.mean(wl.output_len))
    total = STARTUP_S + WARMUP_S
    if calibrate:
        p = np.percentile(wl.input_len, [50, 90])
        out_cal = max(2.0, float(np.percentile(wl.output_len, 50)))
        total += s.calibration_reps * float(np.sum(model.ttft("stock_bf16", p) + out_cal * TPOT_S + SETTLE_S))
    g = GOODPUT_FRACTION * model.capacity(config, wl.input_len)
    serve = float(np.mean(model.ttft(config, wl.input_len))) + out_mean * TPOT_S
    history: list[tuple[float, bool]] = []
    while len(history) < s.max_runs:
        rate = next_rate(history, start, s.step, s.resolution, start / s.span, start * s.span)
        if rate is None:
            break
        ok = rate <= g
        span = float(wl.arrivals_at(rate)[-1])
        if ok:
            total += span + serve + SETTLE_S
        else:
            k = min(n - 1, allowed_misses(n, s.target) + 1)
            total += min(span + serve, float(wl.arrivals_at(rate)[k]) + ttft_slo + serve) + SETTLE_S
        history.append((rate, ok))
    return total


def estimate(workloads: dict[str, Workload], configs: list[str], s: Settings,
             model: TTFTModel | None = None) -> tuple[float, list[str]]:
    """(total seconds, one line per trace x configuration)."""
    model = model or TTFTModel()
    total, lines = 0.0, []
    for name, wl in workloads.items():
        p90 = np.percentile(wl.input_len, 90)
        ttft_slo = s.k_ttft * float(model.ttft("stock_bf16", np.array([p90]))[0])
        start = s.start_factor * model.capacity("stock_bf16", wl.input_len)
        for i, c in enumerate(configs):
            sec = estimate_config(wl, c, start, ttft_slo, model, s, calibrate=(i == 0))
            total += sec
            lines.append(f"  {name:22s} {c:26s} ~{sec / 60:4.1f} min")
    return total, lines
