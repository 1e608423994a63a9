"""Replay one run (a workload at one rate) against the router, with SGLang's ``bench_serving``.

Reused from ``sglang.benchmark.serving`` (what ``python -m sglang.bench_serving`` runs):
* ``get_request(..., use_trace_timestamps=True)``: sends each request at its trace timestamp;
* ``async_request_sglang_generate``: a streamed ``/generate`` with ``input_ids``, ``ignore_eos``,
  recording TTFT (first streamed text) and the end-to-end latency.

Not reused: ``benchmark()`` itself. It has no way to stop a run that has already missed its SLO
(at an overloaded rate that costs ``n x`` service time per sweep point on 2 cores), it reads
the whole CLI namespace (dataset, tokenizer by name or hub id, output file) and prints its own
report. The few lines here schedule the same request function and watch for misses instead.

Early stop: a request that has not finished ``slo.deadline(output_len)`` after it was sent can no
longer meet both SLOs; once more requests have certainly missed than ``allowed_misses`` permits,
the run cannot reach the target, so the client cancels what is in flight and returns (the
caller then aborts the servers' leftovers). Unsent requests are absent from the results and
count as missed.
"""
from __future__ import annotations

import argparse
import asyncio
import time
from typing import Sequence

from eval.goodput.metrics import SLO, RequestResult

_SERVING = None


def _serving():
    """``sglang.benchmark.serving`` with the module-level ``args`` its request function reads."""
    global _SERVING
    if _SERVING is None:
        import sglang.benchmark.serving as serving

        serving.set_global_args(argparse.Namespace(
            temperature=0.0, top_p=1.0, disable_ignore_eos=False, disable_stream=False,
            return_logprob=False, return_routed_experts=False, logprob_start_len=-1,
            top_logprobs_num=0, token_ids_logprob=None, cache_report=False, header=None))
        _SERVING = serving
    return _SERVING


class _Failed:
    success, ttft, latency, output_len = False, 0.0, 0.0, 0

    def __init__(self, error: str):
        self.error = error


def _result(i: int, prompt_len: int, want: int, sent: float, out) -> RequestResult:
    ok = bool(out.success) and out.output_len == want
    err = out.error if not out.success else ("" if ok else f"got {out.output_len} of {want} tokens")
    return RequestResult(i, prompt_len, want, sent, ok, ttft=out.ttft if out.success else None,
                         latency=out.latency if out.success else None, generated=int(out.output_len or 0),
                         error=(err or "")[-300:])


async def _replay(url: str, prompts: Sequence[list[int]], output_lens: Sequence[int],
                  send_times: Sequence[float], slo: SLO, allowed: int, progress) -> tuple[list[RequestResult], bool]:
    s = _serving()
    rows = [s.DatasetRow(prompt=p, prompt_len=len(p), output_len=int(o), timestamp=float(t) * 1000.0)
            for p, o, t in zip(prompts, output_lens, send_times)]
    index = {id(r): i for i, r in enumerate(rows)}
    inflight: dict[int, tuple[asyncio.Task, float]] = {}
    t0 = time.perf_counter()

    async def dispatch() -> None:
        async for row in s.get_request(list(rows), float("inf"), use_trace_timestamps=True, slowdown_factor=1.0):
            i = index[id(row)]
            inp = s.RequestFuncInput(prompt=row.prompt, api_url=f"{url}/generate", prompt_len=row.prompt_len,
                                     output_len=row.output_len, model="", lora_name=None, image_data=None,
                                     extra_request_body={})
            inflight[i] = (asyncio.create_task(s.async_request_sglang_generate(inp)), time.perf_counter() - t0)

    sender = asyncio.create_task(dispatch())
    done: dict[int, RequestResult] = {}
    stopped = False
    while True:
        await asyncio.sleep(0.1)
        now = time.perf_counter() - t0
        late = 0
        for i, (task, sent) in inflight.items():
            if i not in done and task.done():
                out = task.result() if task.exception() is None else _Failed(repr(task.exception()))
                done[i] = _result(i, len(prompts[i]), int(output_lens[i]), sent, out)
                progress(1)
            elif i not in done and now - sent > slo.deadline(int(output_lens[i])):
                late += 1
        misses = late + sum(not r.meets(slo) for r in done.values())
        if misses > allowed:
            stopped = True
            break
        if sender.done() and len(done) == len(inflight):
            sender.result()  # re-raise a dispatch error
            break
    if stopped:
        sender.cancel()
        pending = [t for i, (t, _) in inflight.items() if i not in done]
        for t in pending:
            t.cancel()
        await asyncio.gather(sender, *pending, return_exceptions=True)
    return [done[i] for i in sorted(done)], stopped


def replay(url: str, prompts: Sequence[list[int]], output_lens: Sequence[int], send_times: Sequence[float],
           slo: SLO, allowed_misses: int, progress=lambda n: None) -> tuple[list[RequestResult], bool]:
    """Send ``prompts[i]`` at ``send_times[i]`` s (asking ``output_lens[i]`` tokens) to ``url``'s
    ``/generate``; return (finished requests' results, stopped early)."""
    if not (len(prompts) == len(output_lens) == len(send_times)):
        raise ValueError(f"{len(prompts)} prompts, {len(output_lens)} output lengths, {len(send_times)} send times")
    return asyncio.run(_replay(url, prompts, output_lens, send_times, slo, allowed_misses, progress))
