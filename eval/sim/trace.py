"""Request traces: (arrival seconds, input tokens, output tokens), sorted by arrival.

Vendored traces live in ``eval/traces/<name>.csv.gz`` (columns ``arrival_s,input_len,output_len``;
``load`` by name, ``load_file`` any file in that format, e.g. for ``eval/bench_datasets.py``);
``vendor()`` rebuilds them from the raw files in ``shared/traces/`` (rule in eval/traces/README.md).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TRACE_DIR = REPO / "eval" / "traces"
RAW_DIR = REPO.parent / "shared" / "traces"
TRACES = ("mooncake_conversation", "mooncake_synthetic", "azure_code", "azure_conv")


@dataclass(frozen=True)
class Trace:
    name: str
    arrival: np.ndarray  # [n] float64 seconds from the first request, sorted
    input_len: np.ndarray  # [n] int64
    output_len: np.ndarray  # [n] int64

    def __post_init__(self) -> None:
        n = len(self.arrival)
        if len(self.input_len) != n or len(self.output_len) != n:
            raise ValueError(f"trace {self.name}: arrays differ in length")
        if n > 1 and np.any(np.diff(self.arrival) < 0):
            raise ValueError(f"trace {self.name}: arrivals not sorted")

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def rate(self) -> float:
        """Mean arrival rate in requests per second."""
        span = float(self.arrival[-1] - self.arrival[0])
        return (len(self) - 1) / span if span > 0 else float("inf")

    def head(self, n: int) -> Trace:
        return Trace(self.name, self.arrival[:n], self.input_len[:n], self.output_len[:n])

    def at_rate(self, rate: float) -> Trace:
        """Same requests, inter-arrival gaps scaled so the mean rate is ``rate`` req/s."""
        scale = self.rate / rate
        return Trace(self.name, (self.arrival - self.arrival[0]) * scale, self.input_len, self.output_len)

    def clip(self, max_input: int, max_output: int) -> Trace:
        return Trace(self.name, self.arrival, np.minimum(self.input_len, max_input),
                     np.minimum(self.output_len, max_output))


def load(name: str) -> Trace:
    path = TRACE_DIR / f"{name}.csv.gz"
    if not path.exists():
        raise ValueError(f"trace {name!r} not found at {path}; expected one of: {', '.join(TRACES)}")
    return load_file(path, name)


HEADER = ["arrival_s", "input_len", "output_len"]


def load_file(path: str | Path, name: str | None = None) -> Trace:
    """A trace CSV (``.csv`` or ``.csv.gz``, header ``arrival_s,input_len,output_len``, arrivals
    sorted) -> Trace. A bad header or row raises ValueError naming the file and its line."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    arr, inp, out = [], [], []
    with opener(path, "rt", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != HEADER:
            raise ValueError(f"{path}: header {header}, expected {','.join(HEADER)} "
                             "(the format of eval/traces/, see its README.md)")
        for line, row in enumerate(rows, start=2):
            try:
                a, i, o = row
                a, i, o = float(a), int(i), int(o)
            except ValueError:
                raise ValueError(f"{path} line {line}: {row} is not 'seconds,tokens,tokens' "
                                 "(float, int, int)") from None
            if not np.isfinite(a) or i < 1 or o < 1:
                raise ValueError(f"{path} line {line}: {row}: need a finite arrival and lengths >= 1")
            if arr and a < arr[-1]:
                raise ValueError(f"{path} line {line}: arrival {a} before the previous row's "
                                 f"{arr[-1]}; sort the rows by arrival_s")
            arr.append(a)
            inp.append(i)
            out.append(o)
    if not arr:
        raise ValueError(f"{path}: no rows after the header")
    return Trace(name or path.name.split(".")[0], np.asarray(arr, dtype=np.float64),
                 np.asarray(inp, dtype=np.int64), np.asarray(out, dtype=np.int64))


def poisson(n: int, rate: float, input_len: np.ndarray | int, output_len: np.ndarray | int, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    arr = np.cumsum(rng.exponential(1.0 / rate, n))
    inp = np.broadcast_to(np.asarray(input_len, dtype=np.int64), (n,)).copy()
    out = np.broadcast_to(np.asarray(output_len, dtype=np.int64), (n,)).copy()
    return Trace("poisson", arr - arr[0], inp, out)


# --- vendoring -------------------------------------------------------------------------------
def _read_raw(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if name.startswith("mooncake_"):
        rows = [json.loads(line) for line in open(RAW_DIR / f"{name}_trace.jsonl") if line.strip()]
        t = np.array([r["timestamp"] for r in rows], dtype=np.float64) / 1000.0
        i = np.array([r["input_length"] for r in rows], dtype=np.int64)
        o = np.array([r["output_length"] for r in rows], dtype=np.int64)
    else:
        kind = name.split("_", 1)[1]
        with open(RAW_DIR / f"azure_llm_2023_{kind}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        # "2023-11-16 18:17:03.9799600": 7 fractional digits; keep microseconds
        t = np.array([datetime.strptime(r["TIMESTAMP"].strip()[:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
                      for r in rows], dtype=np.float64)
        i = np.array([int(r["ContextTokens"]) for r in rows], dtype=np.int64)
        o = np.array([int(r["GeneratedTokens"]) for r in rows], dtype=np.int64)
    order = np.argsort(t, kind="stable")
    t, i, o = t[order], i[order], o[order]
    return t - t[0], np.maximum(i, 1), np.maximum(o, 1)


def vendor() -> list[Path]:
    """Write eval/traces/<name>.csv.gz from shared/traces (all rows; hash_ids dropped)."""
    TRACE_DIR.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in TRACES:
        t, i, o = _read_raw(name)
        buf = io.StringIO()
        buf.write("arrival_s,input_len,output_len\n")
        for a, b, c in zip(t.tolist(), i.tolist(), o.tolist()):
            buf.write(f"{a:.3f},{b},{c}\n")
        path = TRACE_DIR / f"{name}.csv.gz"
        with gzip.GzipFile(path, "wb", mtime=0) as f:
            f.write(buf.getvalue().encode())
        paths.append(path)
    return paths
