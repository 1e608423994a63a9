"""The replay loop's early stop, with a fake of the two bench_serving pieces it uses (no server)."""
import asyncio
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from eval.goodput import client
from eval.goodput.metrics import SLO


@dataclass
class Row:
    prompt: list
    prompt_len: int
    output_len: int
    timestamp: float = 0.0


@dataclass
class Inp:
    prompt: list
    api_url: str
    prompt_len: int
    output_len: int
    model: str
    lora_name: object
    image_data: object
    extra_request_body: dict = field(default_factory=dict)


@dataclass
class Out:
    success: bool = False
    ttft: float = 0.0
    latency: float = 0.0
    output_len: int = 0
    error: str = ""


def fake_serving(latency_by_len, cancelled):
    """A request of prompt length L takes latency_by_len[L] s; TTFT is half of it."""
    async def get_request(rows, rate, use_trace_timestamps, slowdown_factor):
        t0 = time.perf_counter()
        for r in rows:
            await asyncio.sleep(max(0.0, r.timestamp / 1000 - (time.perf_counter() - t0)))
            yield r

    async def request(inp):
        lat = latency_by_len[inp.prompt_len]
        try:
            await asyncio.sleep(lat)
        except asyncio.CancelledError:
            cancelled.append(inp.prompt_len)
            raise
        return Out(True, lat / 2, lat, inp.output_len)

    return SimpleNamespace(DatasetRow=Row, RequestFuncInput=Inp, get_request=get_request,
                           async_request_sglang_generate=request)


@pytest.fixture
def fake(monkeypatch):
    cancelled = []

    def install(latency_by_len):
        monkeypatch.setattr(client, "_serving", lambda: fake_serving(latency_by_len, cancelled))
        return cancelled
    return install


def test_run_that_meets_its_slo_finishes_every_request(fake):
    fake({1: 0.05, 2: 0.05, 3: 0.05})
    res, stopped = client.replay("http://x", [[0], [0, 0], [0, 0, 0]], [3, 3, 3], [0.0, 0.02, 0.04],
                                 SLO(1.0, 1.0), allowed_misses=0)
    assert not stopped and [r.index for r in res] == [0, 1, 2]
    assert all(r.ok and r.ttft == pytest.approx(0.025) and r.tpot == pytest.approx(0.0125) for r in res)


def test_run_stops_once_more_requests_missed_than_allowed(fake):
    # prompts of length 2 take 5 s: they can never meet deadline 0.2 + 1 * 0.1 = 0.3 s
    cancelled = fake({1: 0.01, 2: 5.0})
    prompts = [[0], [0, 0], [0, 0], [0], [0]]
    t0 = time.perf_counter()
    res, stopped = client.replay("http://x", prompts, [2] * 5, [0.0, 0.0, 0.0, 0.05, 3.0],
                                 SLO(0.2, 0.1), allowed_misses=1)
    assert stopped and time.perf_counter() - t0 < 2.0  # ~0.3 s deadline, not the 5 s requests
    assert sorted(r.index for r in res) == [0, 3]  # the fast ones finished; request 4 never sent
    assert cancelled == [2, 2]  # the two hopeless requests were cancelled in flight


def test_misses_up_to_the_allowance_do_not_stop_the_run(fake):
    fake({1: 0.01, 2: 0.5})
    res, stopped = client.replay("http://x", [[0], [0, 0], [0]], [2] * 3, [0.0, 0.0, 0.0],
                                 SLO(0.2, 0.1), allowed_misses=1)
    assert not stopped and len(res) == 3 and sum(r.meets(SLO(0.2, 0.1)) for r in res) == 2


def test_short_answers_count_as_failed():
    r = client._result(3, 10, 8, 0.5, Out(True, 0.1, 0.4, 5))
    assert not r.ok and "got 5 of 8" in r.error
    r = client._result(3, 10, 8, 0.5, Out(False, error="boom"))
    assert not r.ok and r.ttft is None and r.error == "boom"


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError):
        client.replay("http://x", [[0]], [1, 2], [0.0], SLO(1, 1), 0)


def test_a_request_function_that_raises_counts_as_failed(monkeypatch):
    serving = fake_serving({1: 0.01}, [])

    async def boom(inp):
        raise RuntimeError("connection reset")
    serving.async_request_sglang_generate = boom
    monkeypatch.setattr(client, "_serving", lambda: serving)
    res, stopped = client.replay("http://x", [[0], [0]], [2, 2], [0.0, 0.0], SLO(1, 1), allowed_misses=2)
    assert not stopped and [r.ok for r in res] == [False, False] and "connection reset" in res[0].error
