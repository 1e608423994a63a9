"""The ``exclusive`` marker (tests/conftest.py): under two xdist workers, no other test runs while
an exclusive one does, and shared tests still run side by side.

A small suite is run in a subprocess with ``-n 2 --dist loadfile``: one file holds an exclusive
test, the other file shared tests; every test logs its (start, end) wall times. Without the
locks the other worker's shared tests overlap the exclusive one (they start together).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFTEST = "from tests.conftest import pytest_configure, pytest_runtest_protocol, pytest_unconfigure  # noqa: F401\n"
_LOG = '''
import json, os, time

def log(name, seconds):
    t0 = time.time()
    time.sleep(seconds)
    with open(os.environ["INTERVALS"], "a") as f:
        f.write(json.dumps([name, t0, time.time()]) + "\\n")
'''
_EXCLUSIVE = _LOG + '''
import pytest

def test_first_shared():
    log("x_shared", 2.0)

@pytest.mark.exclusive
def test_exclusive():
    log("exclusive", 1.5)
'''
_SHARED = _LOG + "".join(f"\ndef test_shared_{i}():\n    log('shared_{i}', 0.4)\n" for i in range(6))


def test_exclusive_test_runs_alone_and_shared_ones_overlap(tmp_path):
    (tmp_path / "conftest.py").write_text(_CONFTEST)
    (tmp_path / "test_a_exclusive.py").write_text(_EXCLUSIVE)
    (tmp_path / "test_b_shared.py").write_text(_SHARED)
    intervals = tmp_path / "intervals.jsonl"
    env = {**os.environ, "PYTHONPATH": ROOT, "INTERVALS": str(intervals)}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
                        "--dist", "loadfile", "-o", "addopts=", str(tmp_path)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(ln) for ln in intervals.read_text().splitlines()]
    assert len(rows) == 8, rows
    (_, x0, x1), = [r for r in rows if r[0] == "exclusive"]
    others = [r for r in rows if r[0] != "exclusive"]
    overlapping = [name for name, t0, t1 in others if t0 < x1 and t1 > x0]
    assert overlapping == [], f"ran beside the exclusive test: {overlapping}"
    # Shared tests of the two files ran side by side (the other worker starts within 2 s).
    x_shared = next(r for r in rows if r[0] == "x_shared")
    assert any(t0 < x_shared[2] and t1 > x_shared[1] for name, t0, t1 in others if name.startswith("shared_"))
