"""``runner.sweep`` refuses to score a run that the router turned away (no server started: the
client's replay and the cluster's settle are replaced; the rate search itself is real)."""

import numpy as np
import pytest

from eval.goodput import runner
from eval.goodput.metrics import SLO, RequestResult
from eval.goodput.workload import Scaling, Workload

ROUTER_503 = ('Service Unavailable: {"error":{"code":"server_selection_failed","message":"No available servers: '
              'No available prefill workers (all circuits open or unhealthy)"}}')


def _workload(n: int = 4) -> Workload:
    return Workload("t", 0, np.arange(n, dtype=np.float64), np.full(n, 32), np.full(n, 4), 1.0, Scaling())


def _fake_replay(errors_from_run: int):
    calls = []

    def replay(url, prompts, output_lens, send_times, slo, allowed, progress):
        calls.append(len(prompts))
        if len(calls) >= errors_from_run:  # this run: the first request is turned away
            return [RequestResult(0, 32, 4, 0.0, ok=False, error=ROUTER_503)], True
        return [RequestResult(i, 32, 4, 0.0, ok=True, ttft=0.1, latency=0.4, generated=4)
                for i in range(len(prompts))], False
    return replay, calls


def test_a_run_the_router_turned_away_stops_the_sweep(monkeypatch):
    replay, calls = _fake_replay(errors_from_run=2)
    monkeypatch.setattr(runner.client, "replay", replay)
    monkeypatch.setattr(runner, "settle", lambda c: None)
    wl = _workload()
    with pytest.raises(RuntimeError, match=r"t memha @ .* req/s: the router turned requests away \(Service "
                                           r"Unavailable.*No available prefill workers"):
        runner.sweep(type("C", (), {"url": "http://router"})(), "memha", wl, [[1] * 32] * len(wl), SLO(10.0, 1.0), runner.Search(start=1.0), 0.9,
                     lambda n, d: type("Bar", (), {"update": lambda s, k=1: None, "close": lambda s: None})(),
                     log=lambda *a: None)
    assert len(calls) == 2  # the first run was scored, the second refused


def test_runs_without_router_errors_are_scored(monkeypatch):
    replay, calls = _fake_replay(errors_from_run=10**9)
    monkeypatch.setattr(runner.client, "replay", replay)
    monkeypatch.setattr(runner, "settle", lambda c: None)
    wl = _workload()
    points = runner.sweep(type("C", (), {"url": "http://router"})(), "memha", wl, [[1] * 32] * len(wl), SLO(10.0, 1.0),
                          runner.Search(start=1.0, max_runs=2),
                          0.9, lambda n, d: type("Bar", (), {"update": lambda s, k=1: None, "close": lambda s: None})(),
                          log=lambda *a: None)
    assert [p.passed for p in points] == [True, True] and len(calls) == 2
