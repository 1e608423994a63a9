"""Trace -> the requests one run replays: a window of the trace, lengths scaled, arrivals re-timed.

The traces (``eval/sim/trace.py``, vendored in ``eval/traces/``) come from GPU clusters serving
models 50-1000x larger than SmolLM2-135M on a 2-core CPU, so they are fitted to the testbed by
two documented changes, nothing else:

* **lengths**: ``round(len * length_scale)``, clipped to ``[min, max]`` (input and output share
  the scale, so each request's input:output ratio is kept except where a clip bites);
* **time**: the window's inter-arrival gaps are multiplied by one factor so its mean rate is the
  rate under test (the burst pattern, i.e. the order and relative gaps, is kept).
  ``rate / native_rate`` is the *rate multiplier* reported with each point.

Before both, ``spread_ties``: a trace's clock has a resolution (its smallest gap between distinct
timestamps: 3 s in Mooncake's conversation trace, 1 ms in Azure's), and the k requests stamped
with one tick arrived somewhere within it; they are spread evenly over that tick
(t, t + res/k, ...). Without this, Mooncake's trace sends 10-14 prompts at the same instant every
3 s, whatever the rate multiplier, and no configuration of a one-prefill CPU testbed meets any
TTFT SLO (measured: stock and memha alike, 0 % at 0.003x). On Azure's trace it moves a tied
request by under 1 ms.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval.sim import trace as trace_mod


@dataclass(frozen=True)
class Scaling:
    length_scale: float = 1 / 8
    min_input: int = 16
    max_input: int = 2048
    min_output: int = 2  # >= 2 so every request has a TPOT
    max_output: int = 32
    # outputs' own scale (None: length_scale). The goodput harness scales both; a TPOT benchmark
    # keeps the trace's outputs (azure_code's are 6-27 tokens, x1/8 leaves 2: one gap per request)
    output_scale: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.length_scale <= 1:
            raise ValueError(f"length_scale={self.length_scale}: expected a value in (0, 1]")
        if not 1 <= self.min_input <= self.max_input:
            raise ValueError(f"min_input={self.min_input}, max_input={self.max_input}: expected 1 <= min <= max")
        if self.output_scale is not None and not 0 < self.output_scale <= 1:
            raise ValueError(f"output_scale={self.output_scale}: expected a value in (0, 1]")
        if not 1 <= self.min_output <= self.max_output:
            raise ValueError(f"min_output={self.min_output}, max_output={self.max_output}: expected 1 <= min <= max")

    def scale(self, lengths: np.ndarray, lo: int, hi: int, factor: float | None = None) -> np.ndarray:
        f = self.length_scale if factor is None else factor
        return np.clip(np.rint(np.asarray(lengths) * f), lo, hi).astype(np.int64)


@dataclass(frozen=True)
class Workload:
    """A trace window fitted to the testbed. Arrays are [n], in the trace's arrival order."""
    trace: str
    offset: int  # index of the window's first request in the trace
    arrival: np.ndarray  # float64 seconds from the window's first request, at the native rate
    input_len: np.ndarray  # int64, scaled
    output_len: np.ndarray  # int64, scaled
    native_rate: float  # the window's own mean rate (req/s)
    scaling: Scaling

    def __len__(self) -> int:
        return len(self.arrival)

    def arrivals_at(self, rate: float) -> np.ndarray:
        """Send times (s from the run's start) at mean rate ``rate``: gaps scaled by one factor."""
        if rate <= 0:
            raise ValueError(f"rate={rate}: expected > 0 requests per second")
        return self.arrival * (self.native_rate / rate)

    def multiplier(self, rate: float) -> float:
        return rate / self.native_rate


def spread_ties(arrival: np.ndarray) -> np.ndarray:
    """[n] sorted float64 seconds -> [n]: each run of k equal stamps t becomes t + res * i / k,
    i = 0..k-1, res = the smallest positive gap between distinct stamps (the trace's clock)."""
    arrival = np.asarray(arrival, dtype=np.float64)
    stamps, first, counts = np.unique(arrival, return_index=True, return_counts=True)
    if len(stamps) < 2 or counts.max() == 1:
        return arrival.copy()
    res = float(np.diff(stamps).min())
    rank = np.arange(len(arrival)) - np.repeat(first, counts)  # position within its tie group
    return arrival + res * rank / np.repeat(counts, counts)


def window(tr: trace_mod.Trace, n: int, offset: int, scaling: Scaling) -> Workload:
    """Requests ``offset .. offset+n-1`` of ``tr`` with lengths scaled by ``scaling``."""
    if n < 2:
        raise ValueError(f"n={n}: a window needs at least 2 requests (its rate is defined by their gaps)")
    if offset < 0 or offset + n > len(tr):
        raise ValueError(f"offset={offset}, n={n}: trace {tr.name} has {len(tr)} requests")
    spread = spread_ties(tr.arrival)
    arr = spread[offset:offset + n] - spread[offset]
    if arr[-1] <= 0:
        raise ValueError(f"trace {tr.name} window at {offset}: all {n} requests arrive at once")
    return Workload(tr.name, offset, arr,
                    scaling.scale(tr.input_len[offset:offset + n], scaling.min_input, scaling.max_input),
                    scaling.scale(tr.output_len[offset:offset + n], scaling.min_output, scaling.max_output,
                                  scaling.output_scale),
                    native_rate=(n - 1) / float(arr[-1]), scaling=scaling)


def load_window(name: str, n: int, offset: int, scaling: Scaling) -> Workload:
    return window(trace_mod.load(name), n, offset, scaling)
