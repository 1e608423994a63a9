#!/usr/bin/env python
"""Fuzz the handshake / descriptor parsers outside pytest: the properties and strategies of
tests/quant/test_handshake_fuzz.py, a fixed seed and a fixed number of examples (default 20000,
split by each property's share). Writes eval/results/fuzz_handshake.json; exits 1 when any
property fails (an exception other than the documented ValueError, an invalid parse, a check
that raised instead of returning a reason).

    python eval/fuzz_handshake.py [--examples 20000] [--seed 20240611] [--out eval/results/fuzz_handshake.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hypothesis  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.quant.test_handshake_fuzz import PROPERTIES  # noqa: E402

# On the code before the fix: [fuzz] found by these properties (eval/fuzz_handshake.py run on the
# old code, 2000 examples), [review] found reading the parsers while writing them. All now raise
# ValueError (parsers, bridges_for) or return a reason string (check_*). Regression inputs:
# test_handshake_fuzz.py::test_known_crashers_are_clean_errors.
CRASHES_FOUND_AND_FIXED = [
    "[fuzz] FormatDescriptor.from_bytes/from_dict: JSON object missing required fields -> TypeError "
    "(__init__ missing arguments); now ValueError naming the missing fields",
    "[fuzz] FormatDescriptor.from_dict: not a dict (list, None...) -> TypeError; now ValueError",
    "[fuzz] FormatDescriptor.from_bytes: deeply nested JSON ('[' * 5000) -> RecursionError, which also "
    "escaped check_prefill_peer / check_decode_peer; now ValueError / a reason string",
    "[fuzz] handshake.check_prefill_peer / bridges_for: kv_layout with a lone surrogate "
    "('memha/1:\\udc80') -> UnicodeEncodeError; now a reason string / ValueError",
    "[fuzz] handshake.check_prefill_peer: non-str kv_layout (bool, int, list from the bootstrap JSON; "
    "bytes) -> AttributeError / TypeError; now a reason string",
    "[fuzz] handshake.bridges_for: kv_layout None -> TypeError, missing fields -> TypeError; now ValueError",
    "[review] FormatDescriptor.from_dict: non-str keys -> TypeError sorting the unknown-field list; "
    "now ValueError listing them",
    "[review] FormatDescriptor.from_bytes: str (non-bytes) argument -> AttributeError; now ValueError",
    "[review] FormatDescriptor: head_dim=true (JSON bool) accepted as head_dim 1 (invalid result); "
    "now ValueError",
    "[review] handshake.check_decode_peer: non-bytes frame -> AttributeError; a bytes frame without "
    "the MEMHA1 prefix was parsed after dropping 6 bytes (could pass); now a reason string",
    "[review] FormatDescriptor.from_bytes: ints over Python's 4300-digit limit gave a bare ValueError "
    "without context; now 'FormatDescriptor bytes are not UTF-8 JSON: ...'",
]


def _counted(prop, counter: list[int]):
    """``prop`` taking one tuple of the strategies' values (@given accepts no *args), counted."""
    def counted(args):
        counter[0] += 1
        prop(*args)
    return counted


def run(examples: int, seed_value: int) -> dict:
    per_property, failures = [], []
    total_share = sum(share for *_, share in PROPERTIES)
    for name, prop, strategies, share in PROPERTIES:
        n = max(1, round(examples * share / total_share))
        counter = [0]
        counted = _counted(prop, counter)
        test = seed(seed_value)(settings(
            max_examples=n, deadline=None, database=None, print_blob=False,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                   HealthCheck.filter_too_much])(given(st.tuples(*strategies))(counted)))
        t0 = time.perf_counter()
        try:
            test()
            ok = True
        except BaseException as e:  # noqa: BLE001 -- report every failure kind, then exit 1
            if isinstance(e, KeyboardInterrupt):
                raise
            ok = False
            found = list(getattr(e, "exceptions", None) or [e])  # hypothesis groups distinct failures
            failures.append({"parser": name, "errors": [f"{type(x).__name__}: {x}"[:500] for x in found],
                             "traceback": traceback.format_exc()[-4000:]})
        secs = time.perf_counter() - t0
        calls = counter[0]
        per_property.append({"parser": name, "max_examples": n, "inputs_tried": calls,
                             "seconds": round(secs, 2), "ok": ok})
        print(f"[fuzz] {name}: {calls} inputs, {secs:.1f}s, {'ok' if ok else 'FAILED'}", flush=True)
    return {"per_property": per_property, "failures": failures}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=20240611)
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results", "fuzz_handshake.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = run(args.examples, args.seed)
    # Every property but the valid round trip feeds malformed / peer-controlled input.
    bad = sum(p["inputs_tried"] for p in res["per_property"] if "round trip" not in p["parser"])
    out = {
        "bad_inputs_tried": bad,
        "inputs_tried_total": sum(p["inputs_tried"] for p in res["per_property"]),
        "note": "bad_inputs_tried: generated peer-controlled inputs (random bytes/text/JSON, truncated or "
                "mutated valid encodings, mangled field dicts, ZMQ messages); a few are valid descriptors "
                "by chance and must parse. inputs_tried_total adds the valid round-trip property",
        "parsers": [p["parser"] for p in res["per_property"]],
        "crashes_found_and_fixed": CRASHES_FOUND_AND_FIXED,
        "unexpected_failures_this_run": res["failures"],
        "per_property": res["per_property"],
        "seed": args.seed,
        "examples_requested": args.examples,
        "seconds": round(time.perf_counter() - t0, 1),
        "python": sys.version.split()[0],
        "hypothesis": hypothesis.__version__,
        "command": f"python eval/fuzz_handshake.py --examples {args.examples} --seed {args.seed}",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"[fuzz] {bad} bad inputs ({out['inputs_tried_total']} in all), {len(res['failures'])} failures, "
          f"{out['seconds']}s -> {args.out}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
