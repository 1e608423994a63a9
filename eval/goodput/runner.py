"""One configuration on one trace: a PD cluster on the shaped link, SLO calibration, the rate sweep.

Between runs the cluster is brought back to idle (``settle``): the servers abort whatever a
stopped run left (``/abort_request`` with ``abort_all``), both report no running, waiting or
queued request (``/v1/loads``), then both radix caches are flushed (``/flush_cache``), so every
run starts cold and the same prompts can be replayed at every rate.
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from eval.goodput import client
from eval.goodput.metrics import (SLO, RequestResult, allowed_misses, attainment, next_rate, passes,
                                  percentiles)
from eval.goodput.workload import Workload
from eval.pd_configs import MAX_TOKENS, PD_CONFIGS, SLOW_LINK_ENV, server_args, thread_env
from sglang_memha.testing import PDCluster
from sglang_memha.testing.procs import http_json

# Retries would re-run a failed (or aborted) request's whole prefill behind the client's back, and
# the circuit breaker would shut a worker out after a stopped run's aborts: both off, for every config.
# The router's health check (5 s timeout, 3 failures) marked a CPU prefill busy with long fp32
# forwards unhealthy mid-run (mooncake_conversation, session 17: every later request got 503
# "No available prefill workers"); this box's longest forward is well under 300 s.
ROUTER_ARGS = ["--disable-retries", "--disable-circuit-breaker", "--health-check-timeout-secs", "300"]
_QUEUES = ("prefill_bootstrap_queue_reqs", "prefill_inflight_queue_reqs", "decode_prealloc_queue_reqs",
           "decode_transfer_queue_reqs", "decode_retracted_queue_reqs")


@dataclass
class RunPoint:
    """One run: the workload replayed at ``rate`` on one configuration."""
    config: str
    trace: str
    rate: float
    multiplier: float  # rate / the window's native rate
    n: int
    attainment: float
    passed: bool
    stopped_early: bool
    wall_s: float
    results: list[RequestResult] = field(repr=False, default_factory=list)

    def summary(self, slo: SLO) -> dict:
        done = [r for r in self.results if r.ok]
        return {"rate": round(self.rate, 4), "multiplier": round(self.multiplier, 4), "n": self.n,
                "finished": len(done), "attainment": round(self.attainment, 4), "passed": self.passed,
                "stopped_early": self.stopped_early, "wall_s": round(self.wall_s, 1),
                "ttft_attainment": round(sum(r.ttft <= slo.ttft_s for r in done) / self.n, 4),
                "tpot_attainment": round(sum(r.tpot <= slo.tpot_s for r in done) / self.n, 4),
                "ttft_s": _rounded(percentiles([r.ttft for r in done])),
                "tpot_s": _rounded(percentiles([r.tpot for r in done])),
                "errors": sorted({r.error for r in self.results if r.error})[:3]}


def _rounded(d: dict) -> dict:
    return {k: (None if v is None else round(v, 4)) for k, v in d.items()}


def start_cluster(name: str, model: str, link, max_len: int, prefill_threads: int, decode_threads: int,
                  log_dir: str, compute_dtype: str = "model") -> PDCluster:
    """The PD cluster of configuration ``name`` (not started: use it in ``with``); ``compute_dtype``
    as ``eval/bench_ttft.py``'s (``pd_configs.server_args``)."""
    cfg = PD_CONFIGS[name]
    flags = server_args(max_len, compute_dtype)
    return PDCluster(model, flags, flags, env={**SLOW_LINK_ENV, **cfg.env},
                     decode_env={**thread_env(decode_threads), **cfg.decode_env},
                     prefill_env=thread_env(prefill_threads),
                     max_total_tokens=MAX_TOKENS, link=link, router_args=ROUTER_ARGS,
                     log_dir=os.path.join(log_dir, name))


def settle(c: PDCluster, timeout_s: float = 300.0) -> None:
    """Abort leftovers, wait until both servers are idle, flush both radix caches."""
    servers = [c.prefill_url, *c.decode_urls]
    for u in servers:
        http_json(f"{u}/abort_request", {"abort_all": True}, timeout=30)
    t0 = time.monotonic()
    while True:
        busy = []
        for u in servers:
            status, body = http_json(f"{u}/v1/loads", timeout=30)
            if status != 200:
                busy.append(f"{u}: /v1/loads {status}")
                continue
            for ld in body["loads"]:
                n = ld["num_running_reqs"] + ld["num_waiting_reqs"] + sum(
                    ld.get("disaggregation", {}).get(q, 0) for q in _QUEUES)
                if n:
                    busy.append(f"{u}: {n} requests")
        if not busy:
            break
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"servers not idle {timeout_s:.0f} s after abort: {busy}")
        time.sleep(0.5)
    for u in servers:
        while http_json(f"{u}/flush_cache", {}, timeout=30)[0] != 200:
            if time.monotonic() - t0 > timeout_s:
                raise RuntimeError(f"{u}/flush_cache refused for {timeout_s:.0f} s")
            time.sleep(0.5)


def warm_up(c: PDCluster, prompt: list[int]) -> None:
    client.replay(c.url, [prompt], [4], [0.0], SLO(1e9, 1e9), 0)
    settle(c)


@dataclass(frozen=True)
class Calibration:
    """Unloaded stock latencies the SLOs are derived from (medians over the reps)."""
    lengths: tuple[int, int]  # the window's p50 and p90 prompt lengths
    ttft_s: tuple[float, float]
    tpot_s: float
    output_len: int

    def ttft_at(self, n: float) -> float:
        """Linear fit through the two points (through 0 when the lengths coincide)."""
        (l0, l1), (t0, t1) = self.lengths, self.ttft_s
        if l1 == l0:
            return t1 * n / l1
        return t0 + (t1 - t0) * (n - l0) / (l1 - l0)

    def capacity_estimate(self, input_lens: np.ndarray) -> float:
        """req/s if requests were served one at a time at their unloaded TTFT."""
        return 1.0 / float(np.mean([max(self.ttft_at(n), 1e-3) for n in input_lens]))

    def slo(self, k_ttft: float, k_tpot: float) -> SLO:
        return SLO(ttft_s=k_ttft * self.ttft_s[1], tpot_s=k_tpot * self.tpot_s)

    def as_dict(self) -> dict:
        return {"lengths": list(self.lengths), "ttft_s": [round(x, 4) for x in self.ttft_s],
                "tpot_s": round(self.tpot_s, 4), "output_len": self.output_len}


def calibrate(c: PDCluster, wl: Workload, prompts_by_len, reps: int, log=print) -> Calibration:
    """One request at a time: ``reps`` each at the window's p50 and p90 prompt length, asking the
    window's median output length (a TPOT over a 2-token answer is its first decode gap, which is
    longer than the steady one, so calibrating on long answers would set a TPOT SLO that the
    trace's typical request cannot meet even alone)."""
    lengths = (int(np.percentile(wl.input_len, 50)), int(np.percentile(wl.input_len, 90)))
    out_len = max(2, int(np.percentile(wl.output_len, 50)))
    ttft: dict[int, list[float]] = {n: [] for n in lengths}
    tpot: list[float] = []
    prompts = prompts_by_len([n for n in lengths for _ in range(reps)])
    for ids in prompts:
        res, _ = client.replay(c.url, [ids], [out_len], [0.0], SLO(1e9, 1e9), 0)
        if not res or not res[0].ok:
            raise RuntimeError(f"calibration request of {len(ids)} tokens failed: {res and res[0].error}")
        ttft[len(ids)].append(res[0].ttft)
        tpot.append(res[0].tpot)
        log(f"  calibration {len(ids):5d} tokens: TTFT {res[0].ttft:.2f} s, TPOT {res[0].tpot * 1e3:.0f} ms")
        settle(c)
    return Calibration(lengths, (statistics.median(ttft[lengths[0]]), statistics.median(ttft[lengths[1]])),
                       statistics.median(tpot), out_len)


@dataclass(frozen=True)
class Search:
    start: float
    step: float = 2 ** 0.5
    refine: int = 1  # bisections after the bracket: final resolution step ** (1 / 2**refine)
    span: float = 16.0  # never below start/span nor above start*span
    max_runs: int = 8

    @property
    def resolution(self) -> float:
        return self.step ** (1.0 / 2 ** self.refine)


def sweep(c: PDCluster, config: str, wl: Workload, prompts: list[list[int]], slo: SLO, search: Search,
          target: float, progress_factory, log=print) -> list[RunPoint]:
    """Rate search (``metrics.next_rate``) with one run per rate; returns the runs in order."""
    points: list[RunPoint] = []
    allowed = allowed_misses(len(wl), target)
    while len(points) < search.max_runs:
        rate = next_rate([(p.rate, p.passed) for p in points], search.start, search.step, search.resolution,
                         search.start / search.span, search.start * search.span)
        if rate is None:
            break
        bar = progress_factory(len(wl), f"{wl.trace} {config} {rate:.3f} req/s")
        t0 = time.monotonic()
        res, stopped = client.replay(c.url, prompts, wl.output_len.tolist(), wl.arrivals_at(rate).tolist(),
                                     slo, allowed, bar.update)
        wall = time.monotonic() - t0
        bar.close()
        att = attainment(res, len(wl), slo)
        p = RunPoint(config, wl.trace, rate, wl.multiplier(rate), len(wl), att, passes(att, target) and not stopped,
                     stopped, wall, res)
        points.append(p)
        s = p.summary(slo)
        shut_out = [e for e in s["errors"] if "No available" in e]
        if shut_out:  # the router had no worker to send to: a router state, not this rate's goodput
            raise RuntimeError(f"{wl.trace} {config} @ {rate:.3f} req/s: the router turned requests away "
                               f"({shut_out[0][:160]}); the run measures the router, not the cluster: "
                               f"see its log (health checks, circuit breaker) and rerun the window")
        log(f"  {config} @ {rate:.3f} req/s (x{p.multiplier:.3f} trace rate): attainment {att:.2f} "
            f"{'PASS' if p.passed else 'miss'}{' (stopped early)' if stopped else ''}, "
            f"TTFT p50/p90 {s['ttft_s']['p50']}/{s['ttft_s']['p90']} s, TPOT p50 {s['tpot_s']['p50']} s, "
            f"{wall:.0f} s")
        settle(c)
    return points
