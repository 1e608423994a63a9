"""Discrete-event simulation of a PD cluster replaying a trace.

Path of one request (mirrors SGLang PD disaggregation):

    arrive -> router picks a prefill instance P and a decode instance D
           -> D preallocates input+output KV tokens (FIFO; waits while D's pool is full)
           -> P's queue; continuous batching up to ``chunk_tokens`` new tokens per batch, long
              prompts chunked; P holds the request's KV until the transfer completes
           -> KV transfer on P's link (whole request after prefill, or per layer pipelined)
           -> first token at D (+ ``handoff_s``): TTFT
           -> joins D's running batch at the next step boundary; one token per step: TPOT

Decode steps are not simulated one by one: between batch changes a step costs
``C[B] + D * S`` with S growing by B per step, so the time of k steps is closed form
(``_steps_time``) and the next boundary after a time t is a quadratic root (``_steps_until``).
That keeps the event count O(requests), which is what makes 10k-request replays take seconds.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .roofline import DecodeCost
from .transfer import Link, pipelined_transfer, whole_transfer

# step_time(new[i], cached[i], n_finishing) -> seconds of one prefill batch
PrefillStepFn = Callable[[np.ndarray, np.ndarray, int], float]


@dataclass(frozen=True)
class PrefillSpec:
    step_time: PrefillStepFn
    n_layers: int
    capacity_tokens: int  # KV tokens the prefill pool holds (requests keep KV until sent)
    chunk_tokens: int  # token budget of one prefill batch
    link: Link  # this instance's egress link to decode
    wire_bytes_per_token: float  # KV bytes of one token over all layers, as sent
    max_batch_requests: int = 1 << 30
    cost_per_hour: float = 0.0
    name: str = "prefill"


@dataclass(frozen=True)
class DecodeSpec:
    cost: DecodeCost
    capacity_tokens: int  # KV tokens of the decode pool (in its pool format)
    max_batch: int
    cost_per_hour: float = 0.0
    name: str = "decode"

    def __post_init__(self) -> None:
        if self.max_batch >= len(self.cost.C):
            raise ValueError(f"DecodeSpec.max_batch={self.max_batch} exceeds the cost table ({len(self.cost.C) - 1})")


@dataclass(frozen=True)
class ClusterSpec:
    prefill: tuple[PrefillSpec, ...]
    decode: tuple[DecodeSpec, ...]
    pipelined: bool = False
    handoff_s: float = 0.0  # fixed delay between KV arrival and the first token (router, bootstrap)
    prefill_policy: str = "least_tokens"  # or "round_robin"
    decode_policy: str = "least_tokens"  # or "round_robin"

    def __post_init__(self) -> None:
        if not self.prefill or not self.decode:
            raise ValueError("ClusterSpec needs at least one prefill and one decode instance")
        for p in (self.prefill_policy, self.decode_policy):
            if p not in ("least_tokens", "round_robin"):
                raise ValueError(f"router policy {p!r} is not supported: expected 'least_tokens' or 'round_robin'")

    @property
    def cost_per_hour(self) -> float:
        return sum(p.cost_per_hour for p in self.prefill) + sum(d.cost_per_hour for d in self.decode)


@dataclass
class SimResult:
    """Per-request outcomes (seconds, NaN where not applicable) of one replay."""

    arrival: np.ndarray
    ttft: np.ndarray
    tpot: np.ndarray  # NaN for 1-token outputs
    e2e: np.ndarray
    failed: np.ndarray  # bool: could never fit in a pool
    makespan: float
    prefill_busy: np.ndarray = field(default_factory=lambda: np.zeros(0))  # busy seconds per P instance
    decode_busy: np.ndarray = field(default_factory=lambda: np.zeros(0))  # busy seconds per D instance


# events
_ARRIVE, _PREFILL_DONE, _KV_ARRIVED, _DECODE_BOUNDARY = 0, 1, 2, 3


def _steps_time(k: int, a: float, b: float) -> float:
    """Seconds of k decode steps whose j-th step costs a + b*j."""
    return k * a + b * k * (k - 1) / 2.0


def _steps_until(dt: float, a: float, b: float) -> int:
    """Smallest k >= 0 with _steps_time(k) >= dt."""
    if dt <= 0:
        return 0
    if b <= 0:
        k = math.ceil(dt / a)
    else:
        # b/2 k^2 + (a - b/2) k - dt = 0
        p = a - b / 2.0
        k = math.ceil((-p + math.sqrt(p * p + 2.0 * b * dt)) / b)
    k = max(k, 0)
    while k > 0 and _steps_time(k - 1, a, b) >= dt:
        k -= 1
    while _steps_time(k, a, b) < dt:
        k += 1
    return k


class _Decode:
    __slots__ = ("spec", "free", "prealloc", "pending", "running", "n", "T", "A", "B", "version", "busy",
                 "next_target", "busy_time")

    def __init__(self, spec: DecodeSpec):
        self.spec = spec
        self.free = spec.capacity_tokens
        self.prealloc: deque[int] = deque()  # requests waiting for a KV reservation
        self.pending: deque[int] = deque()  # KV arrived, waiting to join the batch
        self.running: list[tuple[int, int]] = []  # heap of (finish counter, request)
        self.n = 0  # step counter at the last sync
        self.T = 0.0  # time of step boundary n
        self.A = 0  # S(n) = A + B * n  (KV tokens in the running batch)
        self.B = 0
        self.version = 0
        self.busy = False
        self.next_target = 0  # step counter of the scheduled boundary event
        self.busy_time = 0.0  # seconds of decode steps run (the clock only advances through sync)


class _Prefill:
    __slots__ = ("spec", "free", "queue", "busy", "link_free", "outstanding", "busy_time")

    def __init__(self, spec: PrefillSpec):
        self.spec = spec
        self.free = spec.capacity_tokens
        self.queue: deque[int] = deque()
        self.busy = False
        self.link_free = 0.0
        self.outstanding = 0  # prompt tokens assigned and not yet prefilled (router load signal)
        self.busy_time = 0.0


def simulate(spec: ClusterSpec, arrival: np.ndarray, input_len: np.ndarray, output_len: np.ndarray) -> SimResult:
    """Replay one trace. ``arrival`` in seconds (sorted), lengths in tokens (input >= 1, output >= 1)."""
    arrival = np.asarray(arrival, dtype=np.float64)
    inp = np.asarray(input_len, dtype=np.int64)
    out = np.asarray(output_len, dtype=np.int64)
    n_req = len(arrival)
    if not (len(inp) == len(out) == n_req):
        raise ValueError(f"trace arrays differ in length: {n_req}, {len(inp)}, {len(out)}")
    if n_req and (inp.min() < 1 or out.min() < 1):
        raise ValueError("trace lengths must be >= 1 token")
    if n_req > 1 and np.any(np.diff(arrival) < 0):
        raise ValueError("trace arrivals must be sorted")
    inp_l = inp.tolist()
    out_l = out.tolist()

    P = [_Prefill(s) for s in spec.prefill]
    D = [_Decode(s) for s in spec.decode]
    ttft = np.full(n_req, np.nan)
    finish = np.full(n_req, np.nan)
    failed = np.zeros(n_req, dtype=bool)
    first_tok = [0.0] * n_req
    p_of = [0] * n_req
    d_of = [0] * n_req
    done_tokens = [0] * n_req  # prompt tokens prefilled so far
    n_chunks = [0] * n_req
    first_start = [0.0] * n_req

    heap: list[tuple[float, int, int, object]] = []
    seq = 0

    def push(t: float, kind: int, payload: object) -> None:
        nonlocal seq
        heapq.heappush(heap, (t, seq, kind, payload))
        seq += 1

    for r in range(n_req):
        push(float(arrival[r]), _ARRIVE, r)
    rr_p = 0
    rr_d = 0

    # ---- prefill ------------------------------------------------------------------------------
    def try_prefill(pi: int, now: float) -> None:
        p = P[pi]
        if p.busy or not p.queue:
            return
        budget = p.spec.chunk_tokens
        new: list[int] = []
        cached: list[int] = []
        members: list[int] = []
        finishing: list[int] = []
        for r in p.queue:
            if budget <= 0 or len(members) >= p.spec.max_batch_requests:
                break
            if done_tokens[r] == 0:
                if inp_l[r] > p.free:
                    break  # FIFO: wait for KV to drain from the pool
                p.free -= inp_l[r]
                first_start[r] = now
            take = min(budget, inp_l[r] - done_tokens[r])
            new.append(take)
            cached.append(done_tokens[r])
            members.append(r)
            budget -= take
            if done_tokens[r] + take == inp_l[r]:
                finishing.append(r)
        if not members:
            return
        dt = p.spec.step_time(np.asarray(new), np.asarray(cached), len(finishing))
        for r, take in zip(members, new):
            done_tokens[r] += take
            n_chunks[r] += 1
        for _ in finishing:
            p.queue.popleft()  # finishing requests are always at the head (FIFO, budget in order)
        p.busy = True
        p.busy_time += dt
        push(now + dt, _PREFILL_DONE, (pi, finishing, now, dt))

    def prefill_done(pi: int, finishing: list[int], start: float, dt: float, now: float) -> None:
        p = P[pi]
        p.busy = False
        layer_t = dt / p.spec.n_layers
        for r in finishing:
            p.outstanding -= inp_l[r]
            nbytes = inp_l[r] * p.spec.wire_bytes_per_token
            if spec.pipelined:
                arr, p.link_free = pipelined_transfer(
                    p.spec.link, nbytes, first_start[r] + layer_t, now,
                    p.spec.n_layers * n_chunks[r], p.link_free)
            else:
                arr, p.link_free = whole_transfer(p.spec.link, nbytes, now, p.link_free,
                                                  n_slices=p.spec.n_layers * n_chunks[r])
            push(arr + spec.handoff_s, _KV_ARRIVED, r)
        try_prefill(pi, now)

    # ---- decode -------------------------------------------------------------------------------
    def try_prealloc(di: int, now: float) -> None:
        d = D[di]
        while d.prealloc:
            r = d.prealloc[0]
            need = inp_l[r] + out_l[r]
            if need > d.free:
                break
            d.prealloc.popleft()
            d.free -= need
            pi = p_of[r]
            P[pi].queue.append(r)
            try_prefill(pi, now)

    def sync(d: _Decode, target: int) -> None:
        """Advance the decode clock to step boundary ``target``."""
        k = target - d.n
        if k > 0:
            a = d.spec.cost.C[d.B] + d.spec.cost.D * (d.A + d.B * d.n)
            dt = _steps_time(k, a, d.spec.cost.D * d.B)
            d.T += dt
            d.busy_time += dt
            d.n = target

    def schedule_next(di: int) -> None:
        d = D[di]
        d.version += 1
        if d.B == 0:
            d.busy = False
            return
        d.busy = True
        target = d.running[0][0]
        d.next_target = target
        a = d.spec.cost.C[d.B] + d.spec.cost.D * (d.A + d.B * d.n)
        t = d.T + _steps_time(target - d.n, a, d.spec.cost.D * d.B)
        push(t, _DECODE_BOUNDARY, (di, target, d.version))

    join_n = [0] * n_req

    def on_boundary(di: int) -> None:
        d = D[di]
        now = d.T
        freed = False
        while d.running and d.running[0][0] == d.n:
            _, r = heapq.heappop(d.running)
            finish[r] = now
            d.A -= inp_l[r] + 1 - join_n[r]
            d.B -= 1
            d.free += inp_l[r] + out_l[r]
            freed = True
        while d.pending and d.B < d.spec.max_batch:
            r = d.pending.popleft()
            join_n[r] = d.n
            d.A += inp_l[r] + 1 - d.n
            d.B += 1
            heapq.heappush(d.running, (d.n + out_l[r] - 1, r))
        schedule_next(di)
        if freed:
            try_prealloc(di, now)

    def kv_arrived(r: int, now: float) -> None:
        pi, di = p_of[r], d_of[r]
        P[pi].free += inp_l[r]
        first_tok[r] = now
        ttft[r] = now - arrival[r]
        d = D[di]
        if out_l[r] == 1:
            finish[r] = now
            d.free += inp_l[r] + 1
            try_prealloc(di, now)
        else:
            d.pending.append(r)
            if not d.busy:
                d.T = now
                on_boundary(di)
            elif d.B < d.spec.max_batch:
                # join at the first step boundary at or after now, if that precedes the next finish
                a = d.spec.cost.C[d.B] + d.spec.cost.D * (d.A + d.B * d.n)
                k = _steps_until(now - d.T, a, d.spec.cost.D * d.B)
                if d.n + k < d.next_target:
                    d.version += 1
                    d.next_target = d.n + k
                    push(d.T + _steps_time(k, a, d.spec.cost.D * d.B), _DECODE_BOUNDARY, (di, d.n + k, d.version))
        try_prefill(pi, now)

    # ---- event loop ---------------------------------------------------------------------------
    now = 0.0
    while heap:
        now, _, kind, payload = heapq.heappop(heap)
        if kind == _ARRIVE:
            r = payload  # type: ignore[assignment]
            if spec.prefill_policy == "round_robin":
                pi = rr_p % len(P)
                rr_p += 1
            else:
                pi = min(range(len(P)), key=lambda i: (P[i].outstanding, i))
            if spec.decode_policy == "round_robin":
                di = rr_d % len(D)
                rr_d += 1
            else:
                di = min(range(len(D)), key=lambda i: (1.0 - D[i].free / D[i].spec.capacity_tokens
                                                         if D[i].spec.capacity_tokens else 2.0, i))
            if inp_l[r] > P[pi].spec.capacity_tokens or inp_l[r] + out_l[r] > D[di].spec.capacity_tokens:
                failed[r] = True
                continue
            p_of[r], d_of[r] = pi, di
            P[pi].outstanding += inp_l[r]
            D[di].prealloc.append(r)
            try_prealloc(di, now)
        elif kind == _PREFILL_DONE:
            pi, fin, start, dt = payload  # type: ignore[misc]
            prefill_done(pi, fin, start, dt, now)
        elif kind == _KV_ARRIVED:
            kv_arrived(payload, now)  # type: ignore[arg-type]
        else:
            di, target, version = payload  # type: ignore[misc]
            d = D[di]
            if version != d.version:
                continue
            sync(d, target)
            on_boundary(di)

    tpot = np.full(n_req, np.nan)
    multi = (out > 1) & ~failed
    ft = np.asarray(first_tok)
    tpot[multi] = (finish[multi] - ft[multi]) / (out[multi] - 1)
    return SimResult(arrival=arrival, ttft=ttft, tpot=tpot, e2e=finish - arrival, failed=failed,
                     makespan=now, prefill_busy=np.array([p.busy_time for p in P]),
                     decode_busy=np.array([d.busy_time for d in D]))
