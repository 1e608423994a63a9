"""Latency metrics, SLO attainment, goodput and the rate search (pure functions, no servers).

Definitions (DistServe, OSDI'24):
* TTFT: send -> first streamed token at the client. TPOT: ``(latency - ttft) / (tokens - 1)``,
  the request's mean time per output token after the first (``sglang.benchmark.goodput``'s rule).
* A request *meets the SLO* when it finished with all its tokens, ``ttft <= slo.ttft_s`` and
  ``tpot <= slo.tpot_s``. *Attainment* of a run = requests that met it / requests in the run
  (a request that failed, was cut off or never sent counts as missed).
* *Goodput* = the highest request rate whose attainment is >= ``target`` (0.9), found by a rate
  sweep; here the highest tested rate that passes with every lower tested rate passing too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

TARGET = 0.9
_EPS = 1e-9


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO(ttft_s={self.ttft_s}, tpot_s={self.tpot_s}): both must be > 0")

    def deadline(self, output_len: int) -> float:
        """Latest latency at which a request of ``output_len`` tokens can still meet both SLOs
        (``ttft <= T`` and ``tpot <= P`` imply ``latency <= T + (n - 1) * P``)."""
        return self.ttft_s + max(output_len - 1, 0) * self.tpot_s


@dataclass(frozen=True)
class RequestResult:
    """One request of a run. Times in seconds; ``sent_at`` from the run's start."""
    index: int  # position in the workload
    input_len: int
    output_len: int  # tokens asked for (ignore_eos: the server generates exactly these)
    sent_at: float
    ok: bool  # HTTP 200 and every token arrived
    ttft: float | None = None
    latency: float | None = None
    generated: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.latency is None:
            return None
        return (self.latency - self.ttft) / (self.generated - 1) if self.generated > 1 else 0.0

    def meets(self, slo: SLO) -> bool:
        return (self.ok and self.ttft is not None and self.ttft <= slo.ttft_s + _EPS
                and self.tpot <= slo.tpot_s + _EPS)


def attainment(results: Iterable[RequestResult], n_requests: int, slo: SLO) -> float:
    """Fraction of the run's ``n_requests`` that met ``slo``; missing results count as missed."""
    if n_requests <= 0:
        raise ValueError(f"n_requests={n_requests}: expected >= 1")
    return sum(r.meets(slo) for r in results) / n_requests


def allowed_misses(n_requests: int, target: float = TARGET) -> int:
    """How many of ``n_requests`` may miss while attainment stays >= ``target``."""
    return n_requests - math.ceil(target * n_requests - _EPS)


def passes(att: float, target: float = TARGET) -> bool:
    return att >= target - _EPS


def percentiles(values: Sequence[float], qs: Sequence[int] = (50, 90, 99)) -> dict[str, float | None]:
    """``{"p50": ..., ...}`` (numpy's linear interpolation); None for an empty list."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    return {f"p{q}": (float(np.percentile(v, q)) if len(v) else None) for q in qs}


def goodput(points: Sequence[tuple[float, float]], target: float = TARGET) -> tuple[float, str]:
    """(goodput req/s, how it is bounded) from sweep points ``(rate, attainment)``.

    Walk the tested rates upwards; goodput is the last rate before the first one that misses
    the target. ``status``: ``"bracketed"`` (a higher tested rate missed), ``"lower_bound"`` (the
    highest tested rate passed: the true goodput may be higher), ``"none"`` (even the lowest
    tested rate missed: goodput 0 at the tested rates).
    """
    if not points:
        raise ValueError("no sweep points")
    best = 0.0
    for rate, att in sorted(points):
        if not passes(att, target):
            return best, ("bracketed" if best > 0 else "none")
        best = rate
    return best, "lower_bound"


def next_rate(history: Sequence[tuple[float, bool]], start: float, step: float, resolution: float,
              min_rate: float, max_rate: float) -> float | None:
    """The next rate to test, or None when the search is done.

    history: ``(rate, passed)`` of the runs so far. Geometric steps of ``step`` from ``start``,
    up while runs pass and down while they miss, until a passing rate lies below a missing one;
    then geometric bisection until the two are within a factor ``resolution``. Stops (None) when
    a step would leave ``[min_rate, max_rate]``.
    """
    if step <= 1 or resolution <= 1:
        raise ValueError(f"step={step}, resolution={resolution}: both must be > 1")
    if not history:
        return start
    ok = [r for r, p in history if p]
    bad = [r for r, p in history if not p]
    if not bad:
        nxt = max(ok) * step
        return nxt if nxt <= max_rate * (1 + _EPS) else None
    hi = min(bad)
    below = [r for r in ok if r < hi]
    if not below:
        nxt = hi / step
        return nxt if nxt >= min_rate * (1 - _EPS) else None
    lo = max(below)
    return math.sqrt(lo * hi) if hi / lo > resolution * (1 + 1e-6) else None
