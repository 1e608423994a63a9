"""Where a PD request's time goes, per stage, from SGLang's own per-request log lines.

Servers started with ``--enable-request-time-stats-logging`` log one line per finished request:

    ReqTimeStats(rid=..., bootstrap_room=R, input_len=N, ..., output_len=M, ..., type=decode):
        bootstrap_duration=..ms, alloc_wait_duration=..ms, transfer_duration=..ms,
        queue_duration=..ms, forward_duration=..ms, entry_time=<unix s>

(prefill: ``bootstrap_duration``, ``queue_duration``, ``forward_duration``, ``entry_time``, ...).
Stages are SGLang's (``observability/req_time_stats.py``): on the decode, ``transfer`` is the wait
in the transfer queue until the KV is committed, ``queue`` the wait for a batch slot after it, and
``forward`` the time from the request's first (prebuilt) step to its completion, i.e. the
decode-side part of its TPOT. Prefill and decode lines are joined by bootstrap room.

Used by ``eval/bench_serving_pd.py --time-stats`` (on a run's own lines: ``testing.cluster.LogWindow``); ``python -m eval.request_timeline LOG_DIR``
prints the table for one cluster's logs.
"""
from __future__ import annotations

import os
import re
import statistics
import sys

_LINE = re.compile(r"ReqTimeStats\((?P<head>[^)]*)\): (?P<body>.*)$")
_KV = re.compile(r"(\w+)=([^,]+)")
# The decode's stages before its forward, in order from its prealloc entry: SGLang logs either
# ``prealloc_queue`` or its split into ``bootstrap`` and ``alloc_wait``.
DECODE_BEFORE_FORWARD = ("prealloc_queue", "bootstrap", "alloc_wait", "transfer", "queue")


def parse(lines: list[str]) -> dict[int, dict]:
    """bootstrap room -> {"type", "input_len", "output_len", "entry_time" (unix s), stage: seconds}
    (stage = SGLang's ``<stage>_duration`` field without the suffix)."""
    out = {}
    for line in lines:
        m = _LINE.search(line)
        if not m:
            continue
        head = dict(_KV.findall(m.group("head")))
        if "bootstrap_room" not in head:
            continue
        row = {"type": head.get("type", "").strip(), "input_len": int(head.get("input_len", 0)),
               "output_len": int(head.get("output_len", 0))}
        for k, v in _KV.findall(m.group("body")):
            v = v.strip()
            if v.endswith("ms"):
                row[k.removesuffix("_duration")] = float(v[:-2]) / 1e3
            elif k == "entry_time":
                row[k] = float(v)
        out[int(head["bootstrap_room"])] = row
    return out


def join(prefill_lines: list[str], decode_lines: list[str]) -> list[dict]:
    """One row per request seen on both sides: ``p_<stage>`` and ``d_<stage>`` in seconds, and
    ``d_lag``: how long after the prefill's entry the decode's forward began (its first token)."""
    p, d = parse(prefill_lines), parse(decode_lines)
    rows = []
    for room in sorted(set(p) & set(d), key=lambda r: p[r].get("entry_time", 0)):
        row = {"room": room, "input_len": p[room]["input_len"], "output_len": d[room]["output_len"]}
        row.update({f"p_{k}": v for k, v in p[room].items() if isinstance(v, float) and k != "entry_time"})
        row.update({f"d_{k}": v for k, v in d[room].items() if isinstance(v, float) and k != "entry_time"})
        if "entry_time" in p[room] and "entry_time" in d[room]:
            d_forward_start = d[room]["entry_time"] + sum(d[room].get(s, 0.0) for s in DECODE_BEFORE_FORWARD)
            row["d_lag"] = d_forward_start - p[room]["entry_time"]
        rows.append(row)
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per column: median, mean and max over requests (seconds)."""
    cols = sorted({k for r in rows for k in r if k.startswith(("p_", "d_"))})
    out = {}
    for c in cols:
        vals = [r[c] for r in rows if c in r]
        out[c] = {"median": statistics.median(vals), "mean": statistics.fmean(vals), "max": max(vals)}
    return out


def main(argv: list[str]) -> None:
    """Every request of one cluster's log folder (its ``prefill.log`` and ``decode.log``)."""
    logs = []
    for name in ("prefill", "decode"):
        with open(os.path.join(argv[0], f"{name}.log"), errors="replace") as f:
            logs.append(f.read().splitlines())
    rows = join(*logs)
    print(f"{len(rows)} requests")
    for c, s in summarize(rows).items():
        print(f"{c:28s} median {s['median']:8.2f} s  mean {s['mean']:8.2f} s  max {s['max']:8.2f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
