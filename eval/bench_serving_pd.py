#!/usr/bin/env python
"""What an SGLang user's own benchmark shows: ``python -m sglang.bench_serving`` against stock
bf16 PD and memha PD, each started with the README's hand flags ("Running SGLang on CPU":
torch_native, loopback Mooncake TCP, no shaped link, no ``--max-total-tokens``), in one run.

    .venv/bin/python eval/bench_serving_pd.py --estimate          # what it will run, and how long
    .venv/bin/python eval/bench_serving_pd.py [--runs 3] [--page-sizes 1,16] [--workloads trace,random]

Per round, per page size, per configuration (order reversed every other round, so slow drift of
the box does not favour one side): start the cluster, warm it up, run each workload once with
bench_serving's own client, stop it. Reported per (page size, workload, config): the median and
range over rounds of bench_serving's mean TTFT, mean TPOT and p99 TPOT, and the ratio memha /
stock per round (median and range). Each run also records the CPU seconds every server used
(all processes of its group) and the busiest threads of each scheduler: that is how the TPOT
regression of issue 24 was traced (see eval/RESULTS.md).

Workloads (the issue's):
- ``trace``: bench_serving's ``mooncake`` replay of ``--rows`` rows of ``--trace`` from
  ``--offset`` with the goodput window's lengths (``eval/bench_datasets.py trace --fit-testbed``:
  x1/8, clipped to 16-2,048 in, 2-32 out; the README's recipe), sent at the trace's timestamps.
  ``--raw-lengths`` keeps the trace's own (azure_code's first 20: 34-7,436 tokens): on the 2-core
  box one such run took 8 minutes per config, stock's mean TPOT 26 s (the prefill's 800 CPU-s
  starve the decode), which measures the box, not the plugin;
- ``random``: ``--random-prompts`` prompts at ``--random-rate`` req/s, input uniform up to
  ``--random-input`` tokens (range ratio 0), output ``--random-output``, from the package's
  ShareGPT conversations (``eval/bench_datasets.py sharegpt``).

JSON keys (``--out``): ``tpot_ratio_bench_serving`` / ``ttft_ratio_bench_serving`` = median over
rounds of memha_fp8_pipelined / stock_bf16 mean TPOT / TTFT on the trace replay at the first
page size, plus every per-run figure under ``runs``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eval import request_timeline  # noqa: E402
from eval.bench_threads import group_cpu_s, thread_cpu_s, top_threads  # noqa: E402

# The comparison, started as the README says: MEMHA_* on both servers, pipeline on the
# prefill (its default threshold, 256 tokens). The others isolate one mechanism each.
CONFIGS: dict[str, dict[str, dict[str, str]]] = {
    "stock_bf16": {"prefill": {}, "decode": {}},
    "memha_fp8_pipelined": {"prefill": {"MEMHA_KV_FORMAT": "fp8_e4m3", "MEMHA_PIPELINE": "1"},
                            "decode": {"MEMHA_KV_FORMAT": "fp8_e4m3"}},
    "memha_fp8_whole": {"prefill": {"MEMHA_KV_FORMAT": "fp8_e4m3"}, "decode": {"MEMHA_KV_FORMAT": "fp8_e4m3"}},
    "memha_bf16_pipelined": {"prefill": {"MEMHA_KV_FORMAT": "bf16", "MEMHA_PIPELINE": "1"},
                             "decode": {"MEMHA_KV_FORMAT": "bf16"}},
    "memha_bf16_whole": {"prefill": {"MEMHA_KV_FORMAT": "bf16"}, "decode": {"MEMHA_KV_FORMAT": "bf16"}},
}
BASELINE, HEADLINE = "stock_bf16", "memha_fp8_pipelined"
PROMPT_OVERHEAD = 44  # SmolLM2-135M-Instruct: chat template + "Round 1: " + closing sentence
METRICS = ("mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
           "mean_itl_ms", "completed", "duration", "output_throughput")
# Summarized per config, each with its memha/stock ratio per round. The trace replay's requests
# emit ~2 tokens each, so a request's TPOT is one or two inter-token gaps and the mean TPOT is
# carried by a few outliers; the median TPOT and the mean ITL (over every gap) say more there.
SUMMARY = (("mean_ttft_ms", "ttft"), ("mean_tpot_ms", "tpot"), ("median_tpot_ms", "median_tpot"),
           ("mean_itl_ms", "itl"), ("p99_tpot_ms", "p99_tpot"))


def model_path(name: str) -> str:
    if name == "smollm2":
        from sglang_memha.models.smollm2 import ensure_smollm2
        return ensure_smollm2()
    if name == "tiny":
        from sglang_memha.models.tiny_qwen3 import build
        return build()
    return name


def datasets(args, work: str) -> dict[str, list[str]]:
    """bench_serving's dataset flags per workload (files written offline into ``work``)."""
    out = {}
    if "trace" in args.workloads:
        path = os.path.join(work, f"{args.trace}.jsonl")
        fit = [] if args.raw_lengths else ["--fit-testbed"]
        if args.output_scale is not None:
            fit += ["--output-scale", str(args.output_scale)]
        subprocess.run([sys.executable, "-m", "eval.bench_datasets", "trace", "--trace", args.trace,
                        "--rows", str(args.rows), "--offset", str(args.offset), *fit,
                        "--prompt-overhead", str(PROMPT_OVERHEAD), "--out", path], check=True, cwd=ROOT)
        out["trace"] = ["--dataset-name", "mooncake", "--dataset-path", path, "--num-prompts", str(args.rows),
                        "--mooncake-slowdown-factor", "1.0", "--warmup-requests", "0"]
    if "random" in args.workloads:
        path = os.path.join(work, "sharegpt.json")
        subprocess.run([sys.executable, "-m", "eval.bench_datasets", "sharegpt", "--out", path,
                        "--max-conversations", "3000"], check=True, cwd=ROOT)
        out["random"] = ["--dataset-name", "random", "--dataset-path", path,
                         "--random-input-len", str(args.random_input), "--random-output-len",
                         str(args.random_output), "--random-range-ratio", "0.0",
                         "--num-prompts", str(args.random_prompts), "--request-rate", str(args.random_rate),
                         "--warmup-requests", "1"]
    return out


def bench(cluster, model: str, flags: list[str], out_file: str, time_stats: bool = False) -> dict:
    """One bench_serving run against the cluster's router; its result line plus CPU use, and with
    ``time_stats`` every request's stages from the servers' logs (``eval/request_timeline.py``)
    beside bench_serving's own per-request TTFT and inter-token gaps."""
    from sglang_memha.testing.cluster import LogWindow

    host, port = cluster.url.rsplit("//", 1)[1].split(":")
    window = LogWindow(cluster)
    servers = {p.name: p.pid for p in cluster.procs if p.name != "router"}
    cpu0 = {n: group_cpu_s(pid) for n, pid in servers.items()}
    thr0 = {n: thread_cpu_s(pid) for n, pid in servers.items()}
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--host", host, "--port", port,
           "--model", model, "--tokenizer", model, "--disable-tqdm", "--seed", "1", *flags,
           "--output-file", out_file, *(["--output-details"] if time_stats else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    wall = time.monotonic() - t0
    if proc.returncode != 0 or not os.path.exists(out_file):
        raise RuntimeError(f"bench_serving failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    with open(out_file) as f:
        line = f.readlines()[-1]
    res = json.loads(line)
    row = {k: res.get(k) for k in METRICS}
    row["wall_s"] = wall
    row["cpu_s"] = {n: group_cpu_s(pid) - cpu0[n] for n, pid in servers.items()}
    row["busiest_threads"] = {n: top_threads(thr0[n], thread_cpu_s(pid)) for n, pid in servers.items()}
    if time_stats:
        row["requests"] = request_timeline.join(window.lines("prefill"), window.lines("decode"))
        row["stages"] = request_timeline.summarize(row["requests"])
        row["client"] = [{"input_len": i, "output_len": o, "ttft_s": t, "itl_s": g} for i, o, t, g in
                         zip(res["input_lens"], res["output_lens"], res["ttfts"], res["itls"])]
        # bench_serving starts a request's TTFT at its first chunk with non-empty text. A request
        # whose tokens all detokenize to "" (SmolLM2 under ignore_eos: <|im_end|> and the like,
        # skipped as special tokens) gets ttft 0, and its TPOT becomes its whole latency.
        row["empty_text_requests"] = [i for i, t in enumerate(res["generated_texts"]) if not t]
    return row


def request_tpot_s(client: dict) -> float | None:
    """One request's TPOT from bench_serving's own gaps: (last chunk - first text chunk) /
    (tokens - 1); None when it streamed no text or a single token."""
    if client["ttft_s"] <= 0 or client["output_len"] < 2 or not client["itl_s"]:
        return None
    return sum(client["itl_s"]) / (client["output_len"] - 1)


def add_paired_tpot(runs: list[dict]) -> None:
    """Per non-baseline run with per-request details: mean TPOT over the requests that streamed
    text in both it and the same round's baseline run (the same prompts: bench_serving keeps the
    dataset's order), for both sides, as ``paired_mean_tpot_ms`` / ``paired_base_mean_tpot_ms``."""
    for r in runs:
        if r["config"] == BASELINE or "client" not in r:
            continue
        base = [b for b in runs if b["config"] == BASELINE and "client" in b and
                (b["round"], b["page_size"], b["workload"]) == (r["round"], r["page_size"], r["workload"])]
        if not base:
            continue
        pairs = [(request_tpot_s(a), request_tpot_s(b)) for a, b in zip(r["client"], base[0]["client"])]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            r["paired_requests"] = len(pairs)
            r["paired_mean_tpot_ms"] = 1e3 * statistics.fmean(a for a, _ in pairs)
            r["paired_base_mean_tpot_ms"] = 1e3 * statistics.fmean(b for _, b in pairs)


def warm_up(cluster) -> None:
    """Two requests through the router (first-use costs: tokenizer, kernels, allocator)."""
    from sglang_memha.testing.procs import http_json
    for n in (600, 40):
        status, body = http_json(f"{cluster.url}/generate", {"text": "hi " * n,
                                 "sampling_params": {"max_new_tokens": 8, "temperature": 0}}, timeout=300)
        if status != 200:
            raise RuntimeError(f"warm-up request failed ({status}): {str(body)[:300]}")


def summarize(runs: list[dict], configs: list[str]) -> dict:
    """Per (page, workload, config): median and range of each metric; ratios to the baseline
    per round (same round, same page size, same workload)."""
    table: dict = {}
    keys = sorted({(r["page_size"], r["workload"]) for r in runs})
    for page, wl in keys:
        sel = [r for r in runs if r["page_size"] == page and r["workload"] == wl]
        for cfg in configs:
            rs = [r for r in sel if r["config"] == cfg]
            if not rs:
                continue
            entry = {"runs": len(rs)}
            for m, _short in SUMMARY:
                vals = [r[m] for r in rs if r.get(m) is not None]
                if vals:
                    entry[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
            if cfg != BASELINE:
                for m, short in SUMMARY:
                    ratios = []
                    for r in rs:
                        base = [b for b in sel if b["config"] == BASELINE and b["round"] == r["round"]]
                        if base and base[0].get(m) and r.get(m) is not None:
                            ratios.append(r[m] / base[0][m])
                    if ratios:
                        entry[f"{short}_ratio"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                   "max": max(ratios), "per_round": ratios}
                paired = [r["paired_mean_tpot_ms"] / r["paired_base_mean_tpot_ms"] for r in rs
                          if r.get("paired_base_mean_tpot_ms")]
                if paired:
                    entry["paired_tpot_ratio"] = {"median": statistics.median(paired), "min": min(paired),
                                                  "max": max(paired), "per_round": paired,
                                                  "requests": [r["paired_requests"] for r in rs
                                                               if "paired_requests" in r]}
            table[f"page{page}/{wl}/{cfg}"] = entry
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default), tiny, or a model folder")
    ap.add_argument("--configs", default=f"{BASELINE},{HEADLINE}", help=f"of {', '.join(CONFIGS)}")
    ap.add_argument("--page-sizes", default="1,16")
    ap.add_argument("--workloads", default="trace,random")
    ap.add_argument("--runs", type=int, default=3, help="rounds (each config once per round)")
    ap.add_argument("--trace", default="azure_code")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--raw-lengths", action="store_true",
                    help="the trace's own lengths (azure_code's first 20: up to 7,436 tokens) instead of the "
                         "goodput window's x1/8 (a 2-core box then spends minutes per prompt: TPOT of seconds)")
    ap.add_argument("--random-prompts", type=int, default=40)
    ap.add_argument("--random-rate", type=float, default=1.0)
    ap.add_argument("--random-input", type=int, default=512)
    ap.add_argument("--random-output", type=int, default=32)
    ap.add_argument("--output-scale", type=float, default=None,
                    help="trace outputs x this instead of the goodput window's x1/8 (1: the trace's own, "
                         "clipped to 2-256; azure_code's rows 0-19 then emit 6-27 tokens, not ~2)")
    ap.add_argument("--time-stats", action="store_true",
                    help="servers log SGLang's per-request stage times; each run records them per request "
                         "(eval/request_timeline.py) with bench_serving's per-request TTFT and gaps")
    ap.add_argument("--out", default="eval/results/bench_serving.json")
    ap.add_argument("--estimate", action="store_true", help="print the plan and its time, run nothing")
    args = ap.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad or BASELINE not in configs:
        sys.exit(f"--configs {args.configs}: unknown {bad}, or {BASELINE} (the baseline) missing; "
                 f"choose from {', '.join(CONFIGS)}")
    args.workloads = [w for w in args.workloads.split(",") if w]
    if any(w not in ("trace", "random") for w in args.workloads):
        sys.exit(f"--workloads {','.join(args.workloads)}: expected trace and/or random")
    pages = [int(p) for p in args.page_sizes.split(",") if p]
    per_wl = {"trace": 120, "random": 40 / max(args.random_rate, 1e-3) + 40}
    est = args.runs * len(pages) * len(configs) * (60 + sum(per_wl[w] for w in args.workloads))
    print(f"plan: {args.runs} rounds x page sizes {pages} x configs {configs} x workloads {args.workloads}; "
          f"estimate ~{est / 60:.0f} min on the 2-core box (cluster start ~45 s, trace ~2 min, random ~1.5 min)",
          flush=True)
    if args.estimate:
        return
    os.environ.setdefault("MEMHA_ZYGOTE", "1")
    from sglang_memha.testing import PDCluster

    model = model_path(args.model)
    work = tempfile.mkdtemp(prefix="memha-bench-serving-")
    flags = datasets(args, work)
    runs = []
    for rnd in range(args.runs):
        order = configs if rnd % 2 == 0 else configs[::-1]
        for page in pages:
            for cfg in order:
                env = CONFIGS[cfg]
                page_flags = ["--page-size", str(page)]
                if args.time_stats:
                    page_flags.append("--enable-request-time-stats-logging")
                with PDCluster(model, page_flags, page_flags, max_total_tokens=None,
                               prefill_env=env["prefill"], decode_env=env["decode"],
                               log_dir=os.path.join(work, f"r{rnd}-p{page}-{cfg}")) as c:
                    warm_up(c)
                    for wl in args.workloads:
                        out_file = os.path.join(work, f"r{rnd}-p{page}-{cfg}-{wl}.jsonl")
                        row = bench(c, model, flags[wl], out_file, args.time_stats)
                        row.update(round=rnd, page_size=page, config=cfg, workload=wl)
                        runs.append(row)
                        print(f"round {rnd} page {page} {cfg:22s} {wl:6s} TTFT {row['mean_ttft_ms']:8.0f} ms  "
                              f"TPOT {row['mean_tpot_ms']:6.1f} ms (p99 {row['p99_tpot_ms']:6.1f})  "
                              f"done {row['completed']}  cpu {json.dumps({k: round(v, 1) for k, v in row['cpu_s'].items()})}",
                              flush=True)
    add_paired_tpot(runs)
    table = summarize(runs, configs)
    out = {"command": "python eval/bench_serving_pd.py " + " ".join(sys.argv[1:]), "model": args.model,
           "configs": {c: CONFIGS[c] for c in configs}, "summary": table, "runs": runs,
           "logs": work}
    head = table.get(f"page{pages[0]}/trace/{HEADLINE}", {})
    if "tpot_ratio" in head:
        out["tpot_ratio_bench_serving"] = head["tpot_ratio"]["median"]
        out["ttft_ratio_bench_serving"] = head["ttft_ratio"]["median"]
        for short in ("median_tpot", "itl", "paired_tpot"):
            if f"{short}_ratio" in head:
                out[f"{short}_ratio_bench_serving"] = head[f"{short}_ratio"]["median"]
    for key, entry in table.items():
        extra = "".join(f"  {k} {v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
                        for k, v in entry.items() if k.endswith("_ratio"))
        print(f"{key:40s} TTFT {entry['mean_ttft_ms']['median']:8.0f} ms  TPOT "
              f"{entry['mean_tpot_ms']['median']:6.1f} ms [{entry['mean_tpot_ms']['min']:.1f}, "
              f"{entry['mean_tpot_ms']['max']:.1f}]{extra}")
    os.makedirs(os.path.dirname(os.path.join(ROOT, args.out)), exist_ok=True)
    with open(os.path.join(ROOT, args.out), "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out} (logs in {work})")


if __name__ == "__main__":
    main()
