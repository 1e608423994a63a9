#!/usr/bin/env python
"""Issue 9's reliability table: fault injection + overload + parser fuzzing, one JSON.

* faults: every scenario of ``sglang_memha.testing.faults`` (decode killed mid-transfer, prefill
  killed mid-forward, link cut mid-transfer, client aborts before/during/after the transfer, a
  transfer past its timeout) on fp8 pipelined PD over a 500 kbit/s shaped link (~6 min, root);
* overload: ``eval/results/overload.json`` (``eval/overload_pd.py``, run separately, ~6 min);
* fuzzing: ``eval/results/fuzz_handshake.json`` (``eval/fuzz_handshake.py``).

Writes ``eval/results/reliability.json`` with flat keys ``faults_injected``, ``requests_lost``,
``pages_leaked``, ``bad_inputs_tried`` (totals over all three) and one record per fault, and
prints the markdown table of ``eval/RESULTS.md``. ``requests_lost``: fault victims not aborted
by their client that neither completed nor failed with a named cause (``FaultRecord.lost``: the
expected client text or server log line of the scenario), plus the overload run's lost requests;
each record holds the texts found (``client_cause``, ``log_cause`` and ``log_server``) and what
was expected (``expected``).

    python eval/faults_pd.py
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sglang_memha.models.tiny_qwen3 import build  # noqa: E402
from sglang_memha.testing import faults  # noqa: E402
from sglang_memha.testing.netns import ShapedLink, netns_available  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _load(name: str) -> dict:
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        raise SystemExit(f"{path} missing: run eval/{'overload_pd' if 'overload' in name else 'fuzz_handshake'}.py first")
    with open(path) as f:
        return json.load(f)


def _quote(text: str, width: int = 100) -> str:
    return f"`{text[:width]}`".replace("|", "/") if text else ""


def _answer(r: faults.FaultRecord) -> str:
    reason = ("(client left after the first token)" if r.victim_status == 200 and r.aborted_by_client else
              "(client closed the connection)" if r.victim_status == -1 else
              r.victim_reason.split("exception ")[-1][:110])
    return f"{r.victim_status}: {reason}".replace("|", "/")


def _log_cell(r: faults.FaultRecord) -> str:
    """The server and the line that names the cause, from the failure's text on; MISSING and
    what was expected when no line did."""
    if not r.log_cause:
        return f"MISSING ({r.expected}; {r.log_note})".replace("|", "/")
    line = r.log_cause
    for start in ("Failed to send", "Lost connection", "Request ", "Aborted by", "Abort running"):
        if start in line:
            rid = re.search(r"rid='\w+'", line) if start == "Aborted by" else None
            line = (f"{rid.group(0)} ... " if rid else "") + line[line.index(start):]
            break
    return f"{r.log_server}: {_quote(line)}"


def main() -> None:
    ok, why = netns_available()
    if not ok:
        raise SystemExit(f"needs network namespaces: {why}")
    overload, fuzz = _load("overload.json"), _load("fuzz_handshake.json")
    print("fault scenarios: ~6 min on 2 cores", flush=True)
    with ShapedLink(rate=faults.LINK_RATE, prefix="mhfe") as link:
        recs = faults.run_all(build(), link, tempfile.mkdtemp(prefix="memha-faults-"),
                              progress=lambda r: print(f"  {r.fault}: clear={r.victim_clear} "
                                                       f"client_cause={r.client_cause!r} "
                                                       f"log_cause={r.log_server}:{r.log_cause[:80]!r} "
                                                       f"survivors_ok={r.survivors_ok} "
                                                       f"used_after={r.used_after} ({r.seconds:.0f} s)",
                                                       flush=True))
    res = {
        "faults_injected": len(recs),
        "requests_lost": sum(r.lost for r in recs) + overload["requests_lost"],
        "pages_leaked": sum(r.pages_leaked for r in recs) + overload["pages_leaked"],
        "bad_inputs_tried": fuzz["bad_inputs_tried"],
        "survivors_failed": sum(not r.survivors_ok for r in recs),
        "overload_requests": overload["requests_sent"], "overload_rejected": overload["rejected"],
        "overload_retractions": overload["retractions"],
        "faults": [{**dataclasses.asdict(r), "lost": r.lost, "pages_leaked": r.pages_leaked} for r in recs],
        "command": "python eval/faults_pd.py",
    }
    with open(os.path.join(RESULTS, "reliability.json"), "w") as f:
        json.dump(res, f, indent=1)
    print("\n| fault | victim's answer | cause at the client | cause in a server log | survivors "
          "| pages leaked |\n|---|---|---|---|---|---|")
    for r in recs:
        print(f"| {r.fault} | {_answer(r)} | {_quote(r.client_cause) or '—'} | {_log_cell(r)} "
              f"| {'ok' if r.survivors_ok else 'FAILED'} | {r.pages_leaked} |")
    print(f"\nfaults_injected={res['faults_injected']} requests_lost={res['requests_lost']} "
          f"pages_leaked={res['pages_leaked']} bad_inputs_tried={res['bad_inputs_tried']}")


if __name__ == "__main__":
    main()
