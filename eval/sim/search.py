"""Goodput (max request rate meeting the SLO attainment target) and a P:D search under a budget.

goodput: the trace's requests are replayed at a scaled arrival rate (gaps multiplied, order and
lengths kept); the largest rate at which ``attainment`` of requests meet TTFT <= slo_ttft and
TPOT <= slo_tpot is found by doubling then bisection (DistServe's definition). Requests that can
never fit a pool count as misses.

search: for every system and every prefill count P, the decode count D is the largest the budget
allows (goodput never drops when D grows, so spending the rest on decode is optimal for that P).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cluster import ClusterSpec, SimResult, simulate
from .systems import build_cluster, load_system, systems_table
from .config import price_per_hour
from .trace import Trace


def attainment(r: SimResult, slo_ttft: float, slo_tpot: float) -> float:
    ok = (r.ttft <= slo_ttft) & (np.isnan(r.tpot) | (r.tpot <= slo_tpot)) & ~r.failed
    return float(ok.mean())


def replay(spec: ClusterSpec, tr: Trace) -> SimResult:
    return simulate(spec, tr.arrival, tr.input_len, tr.output_len)


def goodput(spec: ClusterSpec, tr: Trace, slo_ttft: float, slo_tpot: float, target: float = 0.9,
            iters: int = 7) -> float:
    """Largest arrival rate (req/s) with attainment >= target; 0 if even a trickle misses."""
    def ok(rate: float) -> bool:
        return attainment(replay(spec, tr.at_rate(rate)), slo_ttft, slo_tpot) >= target

    lo, hi = 0.0, tr.rate
    if ok(hi):
        lo = hi
        hi *= 2
        while ok(hi):
            lo, hi = hi, hi * 2
            if hi > 1e6:
                return lo
    else:
        probe = hi / 2
        while not ok(probe):
            hi = probe
            probe /= 2
            if probe < 1e-4:
                return 0.0
        lo = probe
    for _ in range(iters):
        mid = np.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return float(lo)


@dataclass(frozen=True)
class Point:
    system: str
    n_prefill: int
    n_decode: int
    cost_per_hour: float
    goodput_rps: float

    @property
    def goodput_per_dollar(self) -> float:
        """Requests served within SLO per dollar."""
        return self.goodput_rps * 3600.0 / self.cost_per_hour if self.cost_per_hour else float("nan")


def search(model: str, tr: Trace, system: str, budget_per_hour: float, price: str = "on_demand",
           max_points: int = 10) -> list[Point]:
    s = load_system(system)
    pp, dp = price_per_hour(s.prefill, price), price_per_hour(s.decode, price)
    slo_ttft, slo_tpot = _slo(tr.name)
    target = systems_table()["attainment"]
    p_max = int((budget_per_hour - dp) // pp)
    if p_max < 1:
        return []
    ps = sorted(set(np.unique(np.round(np.geomspace(1, p_max, min(max_points, p_max))).astype(int)).tolist()))
    out = []
    for p in ps:
        d = int((budget_per_hour - p * pp) // dp)
        if d < 1:
            continue
        spec = build_cluster(model, system, p, d, price)
        out.append(Point(system, p, d, spec.cost_per_hour, goodput(spec, tr, slo_ttft, slo_tpot, target)))
    return out


def _slo(trace_name: str) -> tuple[float, float]:
    from .systems import slo
    return slo(trace_name)
