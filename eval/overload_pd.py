#!/usr/bin/env python
"""Overload of a quantized, pipelined PD deployment through the router (issue 9).

1. **Capacity**: a closed-loop flood (``--probe`` requests, all sent at once, default the
   router's ``--max-concurrent`` so all are admitted) measures how many requests per second the
   deployment completes: ``capacity_rps``. It stands in for the goodput
   rate (the SLO-free ceiling: goodput under any SLO is at most this), so 2x it is an overload
   under any SLO.
2. **Overload**: ``--n`` requests with Poisson arrivals at ``--rate-x`` x ``capacity_rps``
   through the unmodified router, prompts of ``--prompt`` random token ids, outputs of
   ``--out`` tokens. The decode pool is small (``--decode-tokens``) so SGLang's decode
   retraction must run on quantized pages
   (``--reserved`` decode tokens per admitted request, SGLang's default is 512).
   The router admits ``--max-concurrent`` requests and queues ``--queue-size`` more (60 s);
   the rest get an explicit 429.
3. **Drain**: every request has an outcome: ``completed`` (200 with all its tokens),
   ``rejected`` (an HTTP error with a message: explicit) or ``lost`` (no answer within
   ``--timeout``, a dropped connection, or a 200 with fewer tokens). Then each server's used KV
   tokens are read until 0 (``cluster.wait_idle``): ``pages_leaked`` = what is left, in pages.

    python eval/overload_pd.py                  # 1000 requests, ~6 min on 2 cores
    python eval/overload_pd.py --n 200 --json ''   # the CI-sized run of tests/quant/test_overload_pd.py

Writes ``eval/results/overload.json`` (flat keys ``requests_sent``, ``completed``, ``rejected``,
``requests_lost``, ``pages_leaked``, ``retractions``, ``capacity_rps``, ``rate_rps``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time

import aiohttp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sglang_memha.testing import PDCluster  # noqa: E402
from sglang_memha.testing.cluster import wait_idle  # noqa: E402

PAGE_SIZE = 16


def payload(prompt: int, out: int) -> dict:
    return {"input_ids": [random.randrange(100, 1000) for _ in range(prompt)],
            "sampling_params": {"max_new_tokens": out, "temperature": 0, "ignore_eos": True}}


async def _one(session: aiohttp.ClientSession, url: str, body: dict, out: int, timeout: float) -> str:
    try:
        async with session.post(f"{url}/generate", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            text = await r.text()
            if r.status != 200:
                return "rejected" if text.strip() else "lost"  # an error must say something
            done = json.loads(text).get("meta_info", {}).get("completion_tokens")
            return "completed" if done == out else "lost"
    except (asyncio.TimeoutError, aiohttp.ClientError):
        return "lost"


async def _run(url: str, bodies: list[dict], out: int, rate: float | None, timeout: float,
               progress: bool) -> tuple[list[str], float]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks, t0 = [], time.perf_counter()
        for body in bodies:
            tasks.append(asyncio.create_task(_one(session, url, body, out, timeout)))
            if rate:
                await asyncio.sleep(random.expovariate(rate))
        outcomes, done = [], 0
        for fut in asyncio.as_completed(tasks):
            outcomes.append(await fut)
            done += 1
            if progress and done % 50 == 0:
                print(f"  {done}/{len(tasks)} answered, {time.perf_counter() - t0:.0f} s", flush=True)
        return outcomes, time.perf_counter() - t0


def run(model: str, n: int, rate_x: float, prompt: int, out: int, probe: int, decode_tokens: int,
        reserved: int, timeout: float, max_concurrent: int = 32, queue_size: int = 64,
        log_dir: str | None = None, progress: bool = True) -> dict:
    page = ["--page-size", str(PAGE_SIZE)]
    # Few reserved decode tokens per admitted request: the decode admits more than its pool can
    # grow into, so running requests outgrow it and SGLang must retract some (quantized pages).
    decode_args = [*page, "--max-total-tokens", str(decode_tokens), "--num-reserved-decode-tokens", str(reserved)]
    # The router's admission control: beyond max_concurrent in flight and queue_size waiting it
    # answers 429 at once. Without it (max_concurrent -1) requests queue in the decode for longer
    # than SGLang's 300 s bootstrap timeout, the prefill drops them without telling the decode,
    # and they fail only one decode WAITING_TIMEOUT wave at a time (see eval/RESULTS.md).
    router_args = ["--max-concurrent-requests", str(max_concurrent), "--queue-size", str(queue_size),
                   "--queue-timeout-secs", "60"]
    with PDCluster(model, page, decode_args, router_args=router_args,
                   env={"MEMHA_KV_FORMAT": "fp8_e4m3"},
                   prefill_env={"MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": "0"},
                   log_dir=log_dir) as c:
        probe_out, secs = asyncio.run(_run(c.url, [payload(prompt, out) for _ in range(probe)], out,
                                           None, timeout, False))
        capacity = probe_out.count("completed") / secs
        rate = rate_x * capacity
        if progress:
            print(f"capacity {capacity:.2f} req/s ({probe} requests in {secs:.1f} s); "
                  f"overload: {n} requests at {rate:.2f} req/s", flush=True)
        outcomes, secs = asyncio.run(_run(c.url, [payload(prompt, out) for _ in range(n)], out,
                                          rate, timeout, progress))
        used = wait_idle([c.prefill_url, c.decode_url])
        decode_log = c.logs()["decode"]
    retractions = sum(int(m) for m in re.findall(r"Retract requests\. #retracted_reqs: (\d+)", decode_log))
    return {"requests_sent": n, "completed": outcomes.count("completed"),
            "rejected": outcomes.count("rejected"), "requests_lost": outcomes.count("lost"),
            "pages_leaked": sum(-(-u // PAGE_SIZE) for u in used), "used_tokens_after": used,
            "retractions": retractions, "capacity_rps": round(capacity, 3), "rate_rps": round(rate, 3),
            "rate_x_capacity": rate_x, "overload_seconds": round(secs, 1),
            "sustained_rps": round(n / secs, 3),  # what the overloaded deployment actually drained "prompt_tokens": prompt,
            "output_tokens": out, "decode_pool_tokens": decode_tokens, "reserved_decode_tokens": reserved,
            "router_max_concurrent_requests": max_concurrent, "router_queue_size": queue_size,
            "kv_format": "fp8_e4m3",
            "pipeline": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rate-x", type=float, default=2.0)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--out", type=int, default=64)
    ap.add_argument("--probe", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=1024)
    ap.add_argument("--reserved", type=int, default=16, help="--num-reserved-decode-tokens of the decode")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--max-concurrent", type=int, default=32, help="router --max-concurrent-requests (-1: off)")
    ap.add_argument("--queue-size", type=int, default=64, help="router --queue-size")
    ap.add_argument("--json", default="eval/results/overload.json", help="'' to skip writing")
    args = ap.parse_args()
    from sglang_memha.models.tiny_qwen3 import build

    res = run(build(), args.n, args.rate_x, args.prompt, args.out, args.probe, args.decode_tokens,
              args.reserved, args.timeout, args.max_concurrent, args.queue_size)
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "command": "python eval/overload_pd.py " + " ".join(sys.argv[1:])}, f, indent=1)


if __name__ == "__main__":
    main()
