"""Measure per-request TTFT and TPOT medians of SmolLM2-135M on this CPU box, single server vs PD.

One script run, one session: a ``SingleServer`` (setup "a") and then a ``PDCluster`` on loopback
through the unmodified router (setup "b", Mooncake over TCP), both from
``sglang_memha.testing``. Per point: 1 warm-up, then ``--runs`` measured requests, each with fresh
random ``input_ids`` so the radix cache never hits.

* TTFT: non-streamed ``/generate`` with ``max_new_tokens=1``; wall time of the HTTP request.
* TPOT: streamed ``/generate`` (``"stream": true``, ``ignore_eos``, ``--tpot-tokens`` new tokens);
  ``(t_last - t_first) / (n_last - n_first)`` over the chunk arrival times, with ``n`` the chunk's
  ``completion_tokens`` (so coalesced chunks are counted right).
* CPU share of each server's process tree (utime + stime from ``/proc`` over the request's
  wall time, in cores) and the whole machine's busy cores (``/proc/stat``), per TTFT request:
  the simulator scales PD prefill by the measured share, and other users' load shows up as
  ``machine_busy_cores - sum(server shares)``.

Writes raw runs and medians to ``eval/results/cpu_pd_measured.json``; the simulator validates
against it with ``python -m eval.sim validate`` (``eval/sim/validate.py``).

    .venv/bin/python eval/measure_cpu_pd.py            # ~8 min on the shared 2-core box
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request

from sglang_memha.models.smollm2 import ensure_smollm2
from sglang_memha.testing import PDCluster, SingleServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "eval", "results", "cpu_pd_measured.json")
PAGE = ["--page-size", "16"]
CLK = os.sysconf("SC_CLK_TCK")


# --- CPU accounting ------------------------------------------------------------------------
def _tree(pid: int) -> list[int]:
    """pid and all its descendants (scan of /proc)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in parent.items() if pp == p)
    return out


def _cpu_s(pids: list[int]) -> float:
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            t += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return t / CLK


def _machine_busy_s() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / CLK


class CpuMeter:
    """Cores used by each named process tree and by the whole machine over one interval."""

    def __init__(self, roots: dict[str, int]):
        self.trees = {k: _tree(pid) for k, pid in roots.items()}
        self.trees["ours"] = _tree(os.getpid())  # this script + every server it started

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.c0 = {k: _cpu_s(v) for k, v in self.trees.items()}
        self.m0 = _machine_busy_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        self.shares = {k: (_cpu_s(v) - self.c0[k]) / wall for k, v in self.trees.items()}
        self.shares["machine_busy"] = (_machine_busy_s() - self.m0) / wall
        self.shares["foreign"] = max(0.0, self.shares["machine_busy"] - self.shares["ours"])


# --- requests ------------------------------------------------------------------------------
def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 49000) for _ in range(n)]


def ttft_once(url: str, ids: list[int]) -> float:
    body = json.dumps({"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}).encode()
    req = urllib.request.Request(f"{url}/generate", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    dt_s = time.perf_counter() - t0
    if out["meta_info"]["completion_tokens"] != 1:
        raise RuntimeError(f"expected 1 token, got {out['meta_info']}")
    return dt_s


def tpot_once(url: str, ids: list[int], new: int) -> dict:
    payload = {"input_ids": ids, "stream": True,
               "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}}
    req = urllib.request.Request(f"{url}/generate", json.dumps(payload).encode(),
                                 {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    pts: list[tuple[float, int]] = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            line = line.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            n = json.loads(line[5:])["meta_info"]["completion_tokens"]
            if not pts or n > pts[-1][1]:
                pts.append((time.perf_counter() - t0, n))
    (t_first, n_first), (t_last, n_last) = pts[0], pts[-1]
    if n_last != new or n_last <= n_first:
        raise RuntimeError(f"stream ended at {n_last} of {new} tokens ({len(pts)} chunks)")
    return {"tpot_s": (t_last - t_first) / (n_last - n_first), "first_chunk_s": t_first,
            "chunks": len(pts), "n_first": n_first, "n_last": n_last}


def _point(fn, args, rng, roots: dict[str, int]) -> dict:
    """1 warm-up, then measured runs until ``args.runs`` quiet ones or ``args.runs + args.extra`` in all.

    A run is quiet when processes outside this script used at most ``args.quiet_cores`` cores
    on average during it (other people share this box). ``median_s`` is over every measured
    run; ``median_quiet_s`` over the quiet ones (None if fewer than 3); ``median_used_s`` is the
    quiet median when it exists, else the all-runs median: the value the simulator validates on.
    """
    runs = []
    while True:
        with CpuMeter(roots) as m:
            r = fn()
        r.update(cpu_cores=m.shares, loadavg=os.getloadavg()[0], warmup=not runs,
                 quiet=m.shares["foreign"] <= args.quiet_cores)
        runs.append(r)
        meas = [x for x in runs if not x["warmup"]]
        quiet = [x for x in meas if x["quiet"]]
        if len(quiet) >= args.runs and len(meas) >= args.runs or len(meas) >= args.runs + args.extra:
            break
    key = "ttft_s" if "ttft_s" in runs[0] else "tpot_s"
    med = statistics.median(x[key] for x in meas)
    medq = statistics.median(x[key] for x in quiet) if len(quiet) >= 3 else None
    return {"runs": runs, "median_s": med, "median_quiet_s": medq, "quiet_runs": len(quiet),
            "median_used_s": medq if medq is not None else med}


def measure(dep, setup: str, roots: dict[str, int], args, rng: random.Random) -> dict:
    res: dict = {"ttft": {}, "tpot": {}}
    for n in args.prompts:
        p = _point(lambda: {"ttft_s": ttft_once(dep.url, _ids(rng, n))}, args, rng, roots)
        res["ttft"][str(n)] = p
        meas = [r for r in p["runs"] if not r["warmup"]]
        print(f"[{setup}] TTFT {n:5d}: median {p['median_s']:.3f} s quiet {p['median_quiet_s']} "
              f"runs {[(round(r['ttft_s'], 3), round(r['cpu_cores']['foreign'], 2)) for r in meas]}", flush=True)
    for n in args.tpot_ctx:
        p = _point(lambda: tpot_once(dep.url, _ids(rng, n), args.tpot_tokens), args, rng, roots)
        res["tpot"][str(n)] = p
        meas = [r for r in p["runs"] if not r["warmup"]]
        print(f"[{setup}] TPOT ctx {n:5d}: median {p['median_s'] * 1e3:.1f} ms quiet {p['median_quiet_s']} "
              f"runs {[(round(r['tpot_s'] * 1e3, 1), round(r['cpu_cores']['foreign'], 2)) for r in meas]}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[256, 512, 1024, 1536, 2048])
    ap.add_argument("--tpot-ctx", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--tpot-tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=4, help="quiet measured runs wanted per point (after 1 warm-up)")
    ap.add_argument("--extra", type=int, default=3, help="extra runs allowed per point to get quiet ones")
    ap.add_argument("--quiet-cores", type=float, default=0.25,
                    help="a run is quiet if other processes used at most this many cores during it")
    ap.add_argument("--max-total-tokens", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    model = ensure_smollm2()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout)
    out = {"command": " ".join([".venv/bin/python", os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "git_commit": commit, "git_dirty": dirty, "model": "smollm2-135m", "model_path": model,
           "host_cores": os.cpu_count(), "loadavg_start": os.getloadavg(),
           "server_flags": {"page_size": 16, "max_total_tokens": args.max_total_tokens,
                            "pd_transfer": "mooncake_tcp on loopback, through sglang_router"},
           "quiet_runs_wanted": args.runs, "warmup_per_point": 1, "tpot_tokens": args.tpot_tokens,
           "quiet_cores": args.quiet_cores, "extra_runs_allowed": args.extra,
           "note": "shared 2-core box: other engineers' jobs ran at times during this run; each run "
                   "records cpu_cores.foreign (machine busy cores minus this script's process tree) "
                   "and 'quiet' (foreign <= quiet_cores)"}
    t0 = time.time()
    with SingleServer(model, PAGE, max_total_tokens=args.max_total_tokens) as s:
        out["startup_single_s"] = time.time() - t0
        out["a"] = measure(s, "a", {"server": s.procs[0].pid}, args, rng)
    t1 = time.time()
    with PDCluster(model, PAGE, PAGE, max_total_tokens=args.max_total_tokens) as c:
        out["startup_pd_s"] = time.time() - t1
        roots = {p.name: p.pid for p in c.procs}
        out["b"] = measure(c, "b", roots, args, rng)
    out["total_s"] = time.time() - t0
    out["loadavg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out} in {out['total_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
