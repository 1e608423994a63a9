"""TTFT of the compute-transfer pipeline on a shaped link (issue 5), all configurations in one run.

1. **Prefill-only compute**: a single (non-PD) SGLang server, same flags; latency of a
   1-token request per prompt length (no transfer at all).
2. **Link**: prefill and decode servers in two network namespaces joined by a ``tc tbf``-shaped
   veth (``scripts/shaped_link.sh``); router and client in the root namespace. The rate is set
   so that the bf16 KV of a 4K prompt takes as long to cross as its prefill takes (measured in
   step 1), unless ``--rate`` is given.
3. **PD configurations**, one cluster each, same prompts: memha fp8 whole-request with the
   servers on loopback (no shaped link: prefill compute plus every PD overhead, the baseline of
   "exposed transfer"), then on the shaped link stock SGLang PD (bf16 pool, whole request sent
   after the forward), memha bf16 whole-request, memha fp8 whole-request, memha fp8 pipelined,
   memha bf16 pipelined. TTFT = client latency of a non-streaming ``max_new_tokens=1`` request through the
   router (the decode server answers once the KV landed and the first token is committed).
   Pipelined runs set ``MEMHA_PIPELINE_MIN_TOKENS=0`` so every length is measured pipelined;
   the shipped default threshold is chosen from these numbers.

Every prompt is fresh random token ids (no radix-cache hit); lengths are measured in
increasing order, ``--reps`` times each (median reported). ``--chunked-prefill-size`` is larger
than the longest prompt so "whole request" means one forward, then one send.

Writes ``eval/results/ttft.json``: every median and range (``ttft_s_<config>_<n>``,
``ttft_range_s_<config>_<n>``), each effect of ``EFFECTS`` on its own per length with its range
(bytes alone ``ttft_bytes_fp8_vs_bf16_whole_4k``, pipelining alone ``ttft_pipelined_vs_whole_4k``
(fp8) and ``ttft_pipelined_vs_whole_bf16_4k``, both vs stock ``ttft_ratio_4k`` / ``ttft_ratio_256``,
the floor ``ttft_floor_vs_stock_4k``), ``exposed_transfer_fraction_4k``, and ``eval/results/ttft.png``.
Needs root (network namespaces). ``python eval/bench_ttft.py`` (~25 min on 2 cores).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from eval.pd_configs import (COMPUTE_DTYPES, MAX_TOKENS, PD_CONFIGS, SLOW_LINK_ENV,  # noqa: E402
                             matched_link_rate, server_args, thread_env)
from sglang_memha.models.smollm2 import ensure_smollm2  # noqa: E402
from sglang_memha.testing import PDCluster, SingleServer  # noqa: E402
from sglang_memha.testing.netns import ShapedLink, netns_available  # noqa: E402
from sglang_memha.testing.transfer_log import transfer_rows  # noqa: E402

OUT_JSON = os.path.join(ROOT, "eval", "results", "ttft.json")
OUT_PNG = os.path.join(ROOT, "eval", "results", "ttft.png")

NO_LINK = "pd_fp8_no_link"  # prefill compute + PD overheads, KV over loopback (~free)
CONFIGS = {name: PD_CONFIGS[name].env for name in
           (NO_LINK, "stock_bf16", "memha_bf16_whole", "memha_fp8_whole", "memha_fp8_pipelined",
            "memha_bf16_pipelined")}
# Each effect on its own (issue 22): key -> (numerator config, denominator config). Everything on
# the same shaped link, so a ratio changes one thing: the bytes (fp8 vs bf16, both whole-request,
# both memha's code path), the pipelining (per format), or everything vs stock SGLang PD. The
# floor is prefill compute alone (a single server, no transfer).
EFFECTS = {
    "ttft_bytes_fp8_vs_bf16_whole": ("memha_fp8_whole", "memha_bf16_whole"),
    "ttft_pipelined_vs_whole": ("memha_fp8_pipelined", "memha_fp8_whole"),
    "ttft_pipelined_vs_whole_bf16": ("memha_bf16_pipelined", "memha_bf16_whole"),
    "ttft_ratio": ("memha_fp8_pipelined", "stock_bf16"),
    "ttft_memha_bf16_whole_vs_stock": ("memha_bf16_whole", "stock_bf16"),
    "ttft_floor_vs_stock": ("prefill_only", "stock_bf16"),
}


def effect_keys(samples: dict[str, dict[int, list[float]]]) -> dict[str, float | list[float]]:
    """``<effect>_<n>`` = median / median per prompt length, and ``<effect>_<n>_range`` = [min
    of the numerator / max of the denominator, max / min]: the widest the ratio of two single
    requests could be (requests are not paired across configurations)."""
    out: dict[str, float | list[float]] = {}
    for key, (num, den) in EFFECTS.items():
        if num not in samples or den not in samples:
            continue
        for n in sorted(set(samples[num]) & set(samples[den])):
            a, b = samples[num][n], samples[den][n]
            out[f"{key}_{n}"] = round(statistics.median(a) / statistics.median(b), 4)
            out[f"{key}_{n}_range"] = [round(min(a) / max(b), 4), round(max(a) / min(b), 4)]
    return out


def one_request(deploy, n: int, rng: random.Random) -> float:
    ids = [rng.randrange(100, 40000) for _ in range(n)]
    t0 = time.perf_counter()
    status, body = deploy.generate(input_ids=ids, max_new_tokens=1, timeout=1200)
    if status != 200:
        raise RuntimeError(f"{n}-token request failed: {status} {body}")
    return time.perf_counter() - t0


def measure(deploy, lengths: list[int], reps: dict[int, int], seed: int, label: str) -> dict[int, list[float]]:
    rng = random.Random(seed)
    out = {}
    for n in lengths:
        out[n] = []
        for r in range(reps[n]):
            out[n].append(one_request(deploy, n, rng))
            print(f"  {label:22s} {n:5d} tokens rep {r + 1}/{reps[n]}: {out[n][-1]:7.3f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="256,512,1024,2048,4096,8000")
    ap.add_argument("--reps", type=int, default=3, help="requests per length (median and range reported)")
    ap.add_argument("--reps-long", type=int, default=1, help="requests per length above 4096")
    ap.add_argument("--rate", default="auto", help="link rate (tc units, e.g. 40mbit) or 'auto'")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--prefill-threads", type=int, default=1,
                    help="torch threads of the prefill server (OMP_NUM_THREADS); 0 = torch's default. "
                         "1 leaves the second core to Mooncake, whose TCP transport keeps a core busy "
                         "for as long as a transfer is in flight")
    ap.add_argument("--compute-dtype", default="model", choices=COMPUTE_DTYPES,
                    help="float32: compute in fp32, KV cache still bf16 (pd_configs.compute_args), "
                         "for CPUs whose bf16 GEMMs are slow")
    ap.add_argument("--out", default=OUT_JSON)
    ap.add_argument("--log-dir", default="/tmp/memha-bench-ttft")
    ap.add_argument("--table-from", metavar="JSON", help="only print the markdown table of a results file")
    a = ap.parse_args(argv)
    if a.table_from:
        with open(a.table_from) as f:
            print(markdown_table(json.load(f)))
        return
    ok, why = netns_available()
    if not ok:
        sys.exit(f"bench_ttft needs network namespaces for the shaped link: {why}")
    lengths = [int(x) for x in a.lengths.split(",")]
    reps = {n: (a.reps if n <= 4096 else a.reps_long) for n in lengths}
    model = ensure_smollm2()
    flags = server_args(max(lengths), a.compute_dtype)
    t_start = time.perf_counter()

    print("prefill-only (single server, no transfer)", flush=True)
    pf_env = thread_env(a.prefill_threads)
    with SingleServer(model, flags, max_total_tokens=MAX_TOKENS, env=pf_env,
                      log_dir=os.path.join(a.log_dir, "single")) as s:
        one_request(s, 64, random.Random(99))  # warm-up
        prefill = measure(s, lengths, reps, seed=1, label="prefill_only")
    med = {"prefill_only": {n: statistics.median(v) for n, v in prefill.items()}}
    samples = {"prefill_only": prefill}

    ref_len = 4096 if 4096 in lengths else max(lengths)
    if a.rate == "auto":
        rate = matched_link_rate(med["prefill_only"][ref_len], ref_len)
    else:
        rate = a.rate
    print(f"link rate {rate} (bf16 KV of {ref_len} tokens ~ its prefill time)", flush=True)

    transfer_ms: dict[str, dict[int, float]] = {}
    pipelined: dict[str, dict[int, int]] = {}
    with ShapedLink(rate=rate, prefix="memhab") as link:
        for name in a.configs.split(","):
            env = CONFIGS[name]
            print(f"{name}: {env or 'stock SGLang pools'}", flush=True)
            with PDCluster(model, flags, flags, env={**SLOW_LINK_ENV, **env},
                           prefill_env=pf_env,
                           max_total_tokens=MAX_TOKENS, link=None if name == NO_LINK else link,
                           log_dir=os.path.join(a.log_dir, name)) as c:
                before = len(transfer_rows(c.logs()["prefill"]))
                got = measure(c, lengths, reps, seed=1, label=name)
                time.sleep(1.0)  # the transfer line is logged when the room concludes
                rows = transfer_rows(c.logs()["prefill"])[before:]
            med[name] = {n: statistics.median(v) for n, v in got.items()}
            samples[name] = got
            order = [n for n in lengths for _ in range(reps[n])]
            if len(rows) == len(order):
                by_len: dict[int, list] = {}
                for n, r in zip(order, rows):
                    by_len.setdefault(n, []).append(r)
                transfer_ms[name] = {n: statistics.median(r.transfer_ms for r in rs) for n, rs in by_len.items()}
                pipelined[name] = {n: min(r.pipelined_pages for r in rs) for n, rs in by_len.items()}
            else:
                print(f"  warning: {len(rows)} transfer lines for {len(order)} requests", flush=True)

    out = {"command": "python eval/bench_ttft.py " + " ".join(argv or sys.argv[1:]),
           "date": dt.datetime.now().isoformat(timespec="seconds"), "model": "SmolLM2-135M-Instruct",
           "machine": f"{os.cpu_count()} CPU cores, --device cpu, torch_native attention",
           "link_rate": rate, "reps": a.reps, "reps_long": a.reps_long,
           "prefill_threads": a.prefill_threads or "torch default", "compute_dtype": a.compute_dtype,
           "cpu": _cpu_name(),
           "wall_s": round(time.perf_counter() - t_start, 1)}
    for name, m in med.items():
        for n, v in m.items():
            out[f"ttft_s_{name}_{n}"] = round(v, 4)
    for name, m in samples.items():
        for n, v in m.items():
            out[f"ttft_range_s_{name}_{n}"] = [round(min(v), 4), round(max(v), 4)]
    out.update(effect_keys(samples))
    for key in EFFECTS:
        if f"{key}_4096" in out:
            out[f"{key}_4k"] = out[f"{key}_4096"]
    for name, m in transfer_ms.items():
        for n, v in m.items():
            out[f"transfer_ms_{name}_{n}"] = round(v, 1)
    for name, m in pipelined.items():
        for n, v in m.items():
            out[f"pipelined_pages_{name}_{n}"] = v
    pipe = med.get("memha_fp8_pipelined")
    whole = transfer_ms.get("memha_fp8_whole", {})
    if pipe and 4096 in lengths and 4096 in whole:
        # Exposed transfer = what the link adds to TTFT beyond the same PD path with a ~free link
        # (prefill compute, router, bootstrap, decode commit), over the fp8 transfer it hides.
        base = med.get(NO_LINK, med["prefill_only"])[4096]
        exposed = pipe[4096] - base
        out["exposed_transfer_s_4k"] = round(exposed, 4)
        out["exposed_transfer_baseline"] = NO_LINK if NO_LINK in med else "prefill_only"
        out["fp8_transfer_s_4k"] = round(whole[4096] / 1e3, 4)
        out["exposed_transfer_fraction_4k"] = round(exposed / (whole[4096] / 1e3), 4)
        out["exposed_vs_single_server_fraction_4k"] = round(
            (pipe[4096] - med["prefill_only"][4096]) / (whole[4096] / 1e3), 4)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(json.dumps({k: v for k, v in out.items() if k.startswith(("ttft_ratio", "exposed"))
                      or k.endswith("_4k")}, indent=1))
    plot(med, lengths, rate, OUT_PNG if a.out == OUT_JSON else a.out.replace(".json", ".png"))
    print(markdown_table(out))


def _cpu_name() -> str:
    """The CPU model and its widest vector unit torch uses (bf16 GEMM speed depends on it)."""
    import torch

    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def markdown_table(out: dict) -> str:
    """TTFT medians (s) per configuration and prompt length, and pipelined fp8 / stock bf16."""
    names = ["prefill_only", *CONFIGS]
    lengths = sorted({int(k.rsplit("_", 1)[1]) for k in out if k.startswith("ttft_s_prefill_only_")})
    rows = ["| prompt tokens | " + " | ".join(names) + " | pipelined fp8 / stock |",
            "|---" * (len(names) + 2) + "|"]
    for n in lengths:
        cells = [f"{out[f'ttft_s_{c}_{n}']:.2f}" if f"ttft_s_{c}_{n}" in out else "-" for c in names]
        ratio = out.get(f"ttft_ratio_{n}")
        rows.append(f"| {n} | " + " | ".join(cells) + f" | {'-' if ratio is None else f'**{ratio:.3f}**'} |")
    return "\n".join(rows)


def plot(med: dict, lengths: list[int], rate: str, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, m in med.items():
        ax.plot(lengths, [m[n] for n in lengths], marker="o", label=name,
                linestyle="--" if name == "prefill_only" else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT (s)")
    ax.set_title(f"SmolLM2-135M PD on CPU, P->D link {rate}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
