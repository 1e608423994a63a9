#!/usr/bin/env python
"""KV codec figures: bytes per token per format for real model geometries, and quantize /
dequantize throughput next to a plain copy of the same bytes, measured in the same run.

Throughput convention: GB/s of the *bf16 tensor* processed (quantize reads it, dequantize writes
it), against memcpy of a bf16 tensor of the same size (``dst.copy_(src)``). Best of N runs, codec and memcpy alternated.
The GPU section (Triton kernels) runs only where CUDA exists.

    python eval/bench_codecs.py [--tokens 32768] [--reps 7] [--runs 3] [--out eval/results/codecs.json]
    python eval/bench_codecs.py --gpu-only     # on a CUDA machine: eval/results/codecs_gpu.json

The machine is shared: ``--runs`` repeats the CPU measurement (each run records the 1-minute load
average before it); the JSON's headline ratios are the median run's, with the range over runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sglang_memha.kvformat import FORMAT_VERSION, KVFormat, get_codec, kv_bytes_per_token  # noqa: E402

# (name, num_layers, num_kv_heads, head_dim) from the models' config.json
MODELS = [
    ("SmolLM2-135M", 30, 3, 64),
    ("Qwen3-4B", 36, 8, 128),
    ("Qwen3-8B", 36, 8, 128),
    ("Qwen3-14B", 40, 8, 128),
    ("Qwen3-32B", 64, 8, 128),
]


def timed(fn, reps: int, sync=lambda: None) -> float:
    """Best of ``reps`` (the machine is shared: the minimum is the least disturbed run)."""
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def paired(fn, ref, reps: int, sync=lambda: None) -> tuple[float, float]:
    """Alternate ``fn`` and ``ref`` (memcpy) so both see the same machine state; best of each."""
    a, b = [], []
    for _ in range(reps):
        b.append(timed(ref, 1, sync))
        a.append(timed(fn, 1, sync))
    return min(a), min(b)


def bytes_table() -> dict:
    out = {}
    for name, layers, heads, dim in MODELS:
        base = kv_bytes_per_token("bf16", heads, dim) * layers
        out[name] = {
            f.value: {"bytes_per_token_all_layers": kv_bytes_per_token(f, heads, dim) * layers,
                      "ratio_to_bf16": kv_bytes_per_token(f, heads, dim) * layers / base}
            for f in KVFormat
        }
    return out


def cpu_throughput(tokens: int, reps: int) -> dict:
    x = torch.randn(tokens, 8, 128).to(torch.bfloat16)
    nbytes = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    copy = lambda: dst.copy_(x)  # noqa: E731
    memcpy_s = timed(copy, reps)
    res = {"memcpy_GBps": nbytes / memcpy_s / 1e9, "tensor_MB": nbytes / 1e6}
    for f in KVFormat:
        codec = get_codec(f, role="k")  # int4_kivi(_g64): K's codec (V's is int4_g32's / int4_g64's)
        q = codec.quantize(x)
        tq, mq = paired(lambda: codec.quantize(x), copy, reps)
        td, md = paired(lambda: codec.dequantize(*q, torch.bfloat16), copy, reps)
        res[f.value] = {
            "quant_GBps": nbytes / tq / 1e9,
            "dequant_GBps": nbytes / td / 1e9,
            "quant_vs_memcpy": mq / tq,
            "dequant_vs_memcpy": md / td,
        }
    # Quantize-on-write into preallocated buffers (what a KV pool write is), like memcpy's dst.
    for f in (KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ):
        codec = get_codec(f, role="k")
        out = tuple(t.clone() for t in codec.quantize(x))
        tq, mq = paired(lambda: codec.quantize(x, out=out), copy, reps)
        res[f.value].update({"quant_into_GBps": nbytes / tq / 1e9, "quant_into_vs_memcpy": mq / tq})
    return res


GPU_LAUNCH_SHAPES = ((8, 4), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8))  # (rows/program, warps)


def gpu_throughput(tokens: int, shapes=GPU_LAUNCH_SHAPES) -> dict | None:
    """Triton kernels vs a device-to-device copy, timed with ``triton.testing.do_bench`` (median).

    Bandwidth counts bytes read + written: quantize reads the bf16 tensor and writes data + scale
    rows; dequantize the reverse. ``*_vs_memcpy_bw`` divides by ``dst.copy_(src)``'s read + write
    bandwidth on the same tensor, measured in the same run. Each kernel is timed at every
    ``rows_per_program`` option and the best is kept (the option is recorded)."""
    if not torch.cuda.is_available():
        return None
    from triton.testing import do_bench

    from sglang_memha.kvformat import page_geometry
    from sglang_memha.kvformat.triton_kernels import TRITON_FORMATS, dequantize_pages, quantize_to_slots

    dev, page, heads, dim = "cuda", 16, 8, 128
    x = torch.randn(tokens, heads, dim, device=dev).to(torch.bfloat16)
    nbytes = x.numel() * 2
    dst = torch.empty_like(x)
    bench = lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3  # noqa: E731  (s)
    memcpy_bw = 2 * nbytes / bench(lambda: dst.copy_(x))
    res = {"device": torch.cuda.get_device_name(), "memcpy_GBps": memcpy_bw / 1e9, "tokens": tokens,
           "kv_heads": heads, "head_dim": dim, "page_size": page, "timer": "triton.testing.do_bench median"}
    loc = torch.arange(tokens, device=dev)
    pages = torch.arange(tokens // page, device=dev)
    for f in TRITON_FORMATS:
        g = page_geometry(f, page, heads, dim)
        dp = torch.empty(tokens, heads, g.data_bytes_per_head, dtype=torch.uint8, device=dev)
        sp = torch.empty(tokens, heads, g.scale_bytes_per_head, dtype=torch.uint8, device=dev)
        moved = nbytes + dp.numel() + sp.numel()  # bytes read + written
        def kernels(hw=None):
            tq = {sh: bench(lambda: quantize_to_slots(f, x, loc, dp, sp, rows_per_program=sh[0], num_warps=sh[1],
                                                      hw=hw)) for sh in shapes}
            td = {sh: bench(lambda: dequantize_pages(f, dp, sp, pages, page, dim, rows_per_program=sh[0],
                                                     num_warps=sh[1], hw=hw)) for sh in shapes}
            return tq, td

        tq, td = kernels()
        rq, rd = min(tq, key=tq.get), min(td, key=td.get)
        res[f.value] = {"quant_GBps_moved": moved / tq[rq] / 1e9, "dequant_GBps_moved": moved / td[rd] / 1e9,
                        "quant_vs_memcpy_bw": moved / tq[rq] / memcpy_bw, "dequant_vs_memcpy_bw": moved / td[rd] / memcpy_bw,
                        "quant_launch": list(rq), "dequant_launch": list(rd),
                        "quant_vs_memcpy_bw_by_launch": {f"{r}x{w}": moved / v / memcpy_bw for (r, w), v in tq.items()},
                        "dequant_vs_memcpy_bw_by_launch": {f"{r}x{w}": moved / v / memcpy_bw for (r, w), v in td.items()}}
        print(f"{f.value:14s} quantize {res[f.value]['quant_vs_memcpy_bw']:.3f} of copy bw (rows x warps {rq}), "
              f"dequantize {res[f.value]['dequant_vs_memcpy_bw']:.3f} ({rd})", flush=True)
        if f == "fp8_e4m3":
            iq, idq = kernels(hw=False)
            res[f.value]["integer_encoder"] = {"quant_vs_memcpy_bw": moved / min(iq.values()) / memcpy_bw,
                                               "dequant_vs_memcpy_bw": moved / min(idq.values()) / memcpy_bw}
            print(f"{'  integer path':14s} quantize {res[f.value]['integer_encoder']['quant_vs_memcpy_bw']:.3f}, "
                  f"dequantize {res[f.value]['integer_encoder']['dequant_vs_memcpy_bw']:.3f}", flush=True)
    return res


def gpu_main(args) -> None:
    """``--gpu-only``: the Triton section alone (the lent GPU's host CPU is not this machine)."""
    gpu = gpu_throughput(args.gpu_tokens)
    if gpu is None:
        sys.exit("--gpu-only: CUDA is not available here")
    out = {"device": gpu["device"], "format_version": FORMAT_VERSION,
           "quant_vs_memcpy_gpu": gpu["fp8_e4m3"]["quant_vs_memcpy_bw"],
           "dequant_vs_memcpy_gpu": gpu["fp8_e4m3"]["dequant_vs_memcpy_bw"],
           "env": {"torch": torch.__version__, "triton": __import__("triton").__version__}, "gpu": gpu}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"device {gpu['device']}: copy {gpu['memcpy_GBps']:.0f} GB/s (read + write); wrote {args.out}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)  # 64 MiB bf16: beyond the caches
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--runs", type=int, default=3, help="repeat the CPU measurement; headline = median run")
    ap.add_argument("--out", default=None, help="default eval/results/codecs.json (codecs_gpu.json with --gpu-only)")
    ap.add_argument("--gpu-only", action="store_true", help="only the Triton kernels on CUDA")
    ap.add_argument("--gpu-tokens", type=int, default=1 << 18, help="tokens x 8 heads x 128 (512 MiB bf16 at 2^18)")
    args = ap.parse_args()
    if args.gpu_only:
        args.out = args.out or "eval/results/codecs_gpu.json"
        return gpu_main(args)
    args.out = args.out or "eval/results/codecs.json"
    sizes = bytes_table()
    runs = []
    for i in range(args.runs):
        load = os.getloadavg()[0]
        runs.append(cpu_throughput(args.tokens, args.reps))
        runs[-1]["loadavg_1min_before"] = load
        r = runs[-1]
        print(f"run {i + 1}/{args.runs}: load {load:.2f}, fp8 quantize into buffers "
              f"{r['fp8_e4m3']['quant_into_vs_memcpy']:.3f} of memcpy ({r['memcpy_GBps']:.1f} GB/s)", flush=True)
    ranked = sorted(runs, key=lambda r: r["fp8_e4m3"]["quant_into_vs_memcpy"])
    cpu = ranked[len(ranked) // 2]
    span = lambda f, k: [min(r[f][k] for r in runs), max(r[f][k] for r in runs)]  # noqa: E731
    gpu = gpu_throughput(args.gpu_tokens)
    out = {
        "fp8_bytes_ratio": kv_bytes_per_token("fp8_e4m3", 8, 128) / kv_bytes_per_token("bf16", 8, 128),
        # head_dim 64 (SmolLM2, the tiny Qwen3): wire bytes and pool capacity (tokens per byte) vs bf16
        "fp8_bytes_ratio_d64": kv_bytes_per_token("fp8_e4m3", 3, 64) / kv_bytes_per_token("bf16", 3, 64),
        "fp8_capacity_vs_bf16_d64": kv_bytes_per_token("bf16", 3, 64) / kv_bytes_per_token("fp8_e4m3", 3, 64),
        "int4_capacity_vs_bf16_d64": {f: kv_bytes_per_token("bf16", 3, 64) / kv_bytes_per_token(f, 3, 64)
                                      for f in ("int4_g32", "int4_g64")},
        "format_version": FORMAT_VERSION,
        # into preallocated buffers, as memcpy writes into a preallocated dst
        "quant_vs_memcpy_cpu": cpu["fp8_e4m3"]["quant_into_vs_memcpy"],
        "quant_vs_memcpy_cpu_range": span("fp8_e4m3", "quant_into_vs_memcpy"),
        "dequant_vs_memcpy_cpu_range": span("fp8_e4m3", "dequant_vs_memcpy"),
        "cpu_runs": [{"loadavg_1min_before": r["loadavg_1min_before"], "memcpy_GBps": r["memcpy_GBps"],
                      "quant_into_vs_memcpy": r["fp8_e4m3"]["quant_into_vs_memcpy"],
                      "dequant_vs_memcpy": r["fp8_e4m3"]["dequant_vs_memcpy"]} for r in runs],
        "quant_alloc_vs_memcpy_cpu": cpu["fp8_e4m3"]["quant_vs_memcpy"],
        "dequant_vs_memcpy_cpu": cpu["fp8_e4m3"]["dequant_vs_memcpy"],
        "memcpy_GBps_cpu": cpu["memcpy_GBps"],
        "quant_vs_memcpy_gpu": None if gpu is None else gpu["fp8_e4m3"]["quant_vs_memcpy_bw"],
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                "tokens": args.tokens, "kv_heads": 8, "head_dim": 128, "reps": args.reps, "runs": args.runs},
        "bytes_per_token": sizes,
        "cpu": cpu,
        "gpu": gpu,
    }
    for f in KVFormat:
        out[f"{f.value}_bytes_ratio"] = sizes["Qwen3-8B"][f.value]["ratio_to_bf16"]
        out[f"{f.value}_quant_vs_memcpy_cpu"] = cpu[f.value]["quant_vs_memcpy"]
        out[f"{f.value}_dequant_vs_memcpy_cpu"] = cpu[f.value]["dequant_vs_memcpy"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"{'format':16s} {'B/tok Qwen3-8B':>14s} {'ratio':>6s} {'quant GB/s':>10s} {'deq GB/s':>9s} {'q/memcpy':>8s} {'dq/memcpy':>9s}")
    for f in KVFormat:
        c = cpu[f.value]
        s = sizes["Qwen3-8B"][f.value]
        print(f"{f.value:16s} {s['bytes_per_token_all_layers']:14d} {s['ratio_to_bf16']:6.4f} {c['quant_GBps']:10.2f} "
              f"{c['dequant_GBps']:9.2f} {c['quant_vs_memcpy']:8.3f} {c['dequant_vs_memcpy']:9.3f}")
    for f in ("fp8_e4m3", "fp8_e4m3fnuz"):
        print(f"{f:16s} quantize into preallocated buffers: {cpu[f]['quant_into_GBps']:.2f} GB/s, "
              f"{cpu[f]['quant_into_vs_memcpy']:.3f} of memcpy")
    print(f"memcpy {cpu['memcpy_GBps']:.2f} GB/s ({cpu['tensor_MB']:.1f} MB bf16), threads={torch.get_num_threads()}; gpu={gpu is not None}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
