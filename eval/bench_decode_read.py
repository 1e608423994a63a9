#!/usr/bin/env python
"""What one decode step's KV reads cost on CPU: the torch-native attention's ``k_cache[slots]`` /
``v_cache[slots]`` for every layer and request, stock SGLang bf16 pool vs the memha pools (deferred
dequantization: the rows are decoded as they are gathered).

Pools are the real classes (SGLang's ``MHATokenToKVPool``, ``MemhaQuantKVPool``) at SmolLM2-135M's
geometry (30 layers, 3 kv heads, head_dim 64) holding ``--batch`` requests of ``--tokens`` tokens.
Each configuration is timed alternately with the stock pool in the same process (best of
``--reps`` per round, median over ``--rounds``), and reported as a ratio to it.

    OMP_NUM_THREADS=1 .venv/bin/python eval/bench_decode_read.py [--batch 4] [--tokens 2048]
    .venv/bin/python eval/bench_decode_read.py --batch 20 --tokens 400 --hog 1   # a busy neighbour

``--hog N`` runs N spinning processes beside the measurement, as a busy prefill server shares this
2-core box with its decode: with 2 torch threads, every OpenMP parallel region then waits for a
descheduled thread. ``fp8_e4m3 (2 threads)`` forces the fused kernel onto torch's thread count
(what it did before ``cpu_kernels.PARALLEL_MIN_ELEMENTS``), so the ratio isolates that choice.

``fp8_e4m3 (unfused)`` is the path before the fused kernel: gather the uint8 rows, split data
and scales, decode (``MemhaQuantKVPool.read_rows``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

L, H, D = 30, 3, 64


class _Layer:
    def __init__(self, i):
        self.layer_id = i


def build(kind: str, size: int):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool

    cls = MHATokenToKVPool if kind == "stock_bf16" else MemhaQuantKVPool.configured(kind.split()[0], "none", "bench")
    pool = cls(size, page_size=16, dtype=torch.bfloat16, head_num=H, head_dim=D, layer_num=L, device="cpu",
               enable_memory_saver=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, H, D, generator=g).bfloat16()
    loc = torch.arange(size)
    for layer in range(L):
        pool.set_kv_buffer(_Layer(layer), loc, x, x)
    return pool


def step_fn(kind: str, pool, reqs):
    if kind.endswith("(2 threads)"):
        from sglang_memha.kvformat import cpu_kernels

        inner = step_fn(kind.split()[0], pool, reqs)

        def step():
            saved = cpu_kernels.PARALLEL_MIN_ELEMENTS
            cpu_kernels.PARALLEL_MIN_ELEMENTS = 0  # every call on torch's thread count
            try:
                inner()
            finally:
                cpu_kernels.PARALLEL_MIN_ELEMENTS = saved
        return step
    if kind.endswith("(unfused)"):
        def read(s, is_key, layer):
            data, scales = (pool.k_buffer if is_key else pool.v_buffer)[layer], pool.scale_rows(is_key, layer)
            return pool.read_rows(data[s], None if scales is None else scales[s], is_key, layer)

        def step():
            for layer in range(L):
                for s in reqs:
                    read(s, True, layer)
                    read(s, False, layer)
        return step

    def step():
        for layer in range(L):
            kb, vb = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
            for s in reqs:
                kb[s]
                vb[s]
    return step


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kinds", default="fp8_e4m3,fp8_e4m3 (unfused),int8,int4_g64,bf16")
    ap.add_argument("--hog", type=int, default=0, help="spinning processes beside the measurement")
    ap.add_argument("--out", default="eval/results/decode_read.json")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    size = args.batch * args.tokens + 64
    reqs = [torch.arange(b * args.tokens, (b + 1) * args.tokens, dtype=torch.int32) + 1 for b in range(args.batch)]
    pools = {k: build(k, size) for k in ["stock_bf16", *kinds]}
    steps = {k: step_fn(k, p, reqs) for k, p in pools.items()}
    for fn in steps.values():
        fn()  # warm-up (kernel build, allocator)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hog)]
    try:
        times, ratios = measure(steps, kinds, args)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    out = {"machine": "see eval/RESULTS.md", "torch_threads": torch.get_num_threads(), "batch": args.batch,
           "tokens": args.tokens, "layers": L, "kv_heads": H, "head_dim": D, "hog_processes": args.hog,
           "rounds": args.rounds, "stock_bf16_ms": 1e3 * statistics.median(times["stock_bf16"]),
           "command": "python eval/bench_decode_read.py " + " ".join(sys.argv[1:])}
    print(f"decode-step KV reads, {args.batch} x {args.tokens} tokens, {L} layers, {torch.get_num_threads()} thread(s), "
          f"{args.hog} spinning neighbour(s): stock bf16 {out['stock_bf16_ms']:.1f} ms")
    for k in kinds:
        key = k.replace(" (unfused)", "_unfused").replace(" (2 threads)", "_2threads")
        out[f"read_ms_{key}"] = 1e3 * statistics.median(times[k])
        out[f"read_vs_stock_bf16_{key}"] = statistics.median(ratios[k])
        out[f"read_vs_stock_bf16_{key}_range"] = [min(ratios[k]), max(ratios[k])]
        print(f"  {k:22s} {out[f'read_ms_{key}']:7.1f} ms  x{out[f'read_vs_stock_bf16_{key}']:.2f} of stock "
              f"(rounds: {', '.join(f'{r:.2f}' for r in ratios[k])})")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


def measure(steps, kinds, args) -> tuple[dict, dict]:
    """Per round, each kind right after a stock-pool step: (times, ratios to that stock step)."""
    ratios = {k: [] for k in kinds}
    times = {k: [] for k in ["stock_bf16", *kinds]}
    for _ in range(args.rounds):
        for k in kinds:
            base = best_of(steps["stock_bf16"], args.reps)
            t = best_of(steps[k], args.reps)
            times["stock_bf16"].append(base)
            times[k].append(t)
            ratios[k].append(t / base)
    return times, ratios


if __name__ == "__main__":
    main()
