"""The harness cleans up after itself (issue 24).

- An owner process killed by SIGTERM, by SIGINT while SIGINT is ignored (a background job), or by
  SIGKILL leaves none of its servers behind; a handler of its own still runs; the handler goes
  away with the last server. Cheap: the "servers" are sleeping Python processes.
- One real PD cluster (marker ``cluster``): its owner gets SIGTERM once the cluster is up, and no
  process of the deployment (prefill, decode, router, their schedulers, anything in their process
  groups) survives; a request right after ``start(ready="health")`` is served, not 503.
- Each run's logs hold that run only; the router wait names what is missing.

Every process a test starts is killed in ``finally`` by PID, whatever the outcome.
"""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from sglang_memha.testing import procs
from sglang_memha.testing.cluster import _Deployment, router_missing, wait_router_workers
from sglang_memha.testing.procs import ClusterError, ManagedProcess, free_port, http_json, wait_until

ROOT = Path(__file__).resolve().parents[1]
SLEEPER = ("import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")

OWNER = r"""
import json, os, signal, sys, time
from sglang_memha.testing.procs import ManagedProcess
out, mode = sys.argv[1], sys.argv[2]
if mode == "int_ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
if mode == "chain":
    def mine(signum, frame):
        open(out + ".chained", "w").write(str(signum))
        sys.exit(3)
    signal.signal(signal.SIGTERM, mine)
code = {code!r} if mode != "kill" else "import time; time.sleep(600)"
ps = [ManagedProcess(f"s{{i}}", [sys.executable, "-c", code], out + f".s{{i}}.log", dict(os.environ)).start()
      for i in range(2)]
json.dump([p.pid for p in ps], open(out + ".tmp", "w"))
os.rename(out + ".tmp", out)
time.sleep(600)
""".format(code=SLEEPER)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _in_groups(pgids: set[int]) -> set[int]:
    """Every live process whose process group is one of ``pgids``."""
    found = set()
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) in pgids and not _gone(p.pid):
                found.add(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def _kill_all(owner: subprocess.Popen | None, pgids: set[int], pids: set[int]) -> None:
    """Last-resort cleanup, by PID: the owner, the groups it started, every process seen."""
    if owner is not None and owner.poll() is None:
        owner.kill()
        owner.wait(timeout=30)
    for g in pgids:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_file(path: Path, owner: subprocess.Popen, timeout_s: float) -> dict | list:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert owner.poll() is None, f"owner exited {owner.returncode}:\n{owner.stdout.read()[-4000:]}"
        assert time.monotonic() < deadline, f"owner did not write {path} within {timeout_s:.0f}s"
        time.sleep(0.2)
    return json.loads(path.read_text())


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in pids if not _gone(p)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _owner(argv: list[str], tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("mode,sig,code", [("term", signal.SIGTERM, -signal.SIGTERM),
                                           ("int_ignored", signal.SIGINT, -signal.SIGINT),
                                           ("chain", signal.SIGTERM, 3),
                                           ("kill", signal.SIGKILL, -signal.SIGKILL)])
def test_owner_signal_stops_its_processes(tmp_path, mode, sig, code):
    out = tmp_path / "pids.json"
    owner = _owner(["-c", OWNER, str(out), mode], tmp_path)
    pgids: set[int] = set()
    seen: set[int] = set()
    try:
        pgids = set(_wait_file(out, owner, 60))
        wait_until(lambda: len(_in_groups(pgids)) >= (2 if mode == "kill" else 4), 30, [],
                   "the sleepers and their children")
        seen = _in_groups(pgids)
        owner.send_signal(sig)
        assert owner.wait(timeout=30) == code, owner.stdout.read()[-4000:]
        assert not _wait_gone(seen, 30), f"left running after {mode}: {_wait_gone(seen, 0)}"
        assert not _in_groups(pgids)
        if mode == "chain":
            assert (tmp_path / "pids.json.chained").read_text() == str(int(signal.SIGTERM))
    finally:
        _kill_all(owner, pgids, seen)


def test_handler_installed_while_live_and_restored(tmp_path):
    if procs._LIVE:
        pytest.skip("another deployment of this test process is live: the handler stays")
    # SIGINT's previous handler is Python's, or SIG_IGN where the suite runs as a background job
    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    p = ManagedProcess("s", [sys.executable, "-c", "import time; time.sleep(600)"],
                       str(tmp_path / "s.log"), dict(os.environ))
    try:
        p.start()
        assert signal.getsignal(signal.SIGTERM) is procs._on_signal
        assert signal.getsignal(signal.SIGINT) is procs._on_signal
    finally:
        p.stop(grace_s=5)
    assert signal.getsignal(signal.SIGTERM) is before
    assert signal.getsignal(signal.SIGINT) is before_int


def test_each_run_logs_fresh(tmp_path):
    for run in ("first", "second"):
        d = _Deployment(str(tmp_path))
        try:
            p = d._spawn("prefill", ["-c", f"print('sglang-memha transfer run={run}')"], dict(os.environ))
            wait_until(lambda: not p.alive(), 30, [], "the process to finish")
            logs = d.logs()
        finally:
            d.close()
    assert logs["prefill"].strip() == "sglang-memha transfer run=second"
    assert (tmp_path / "prefill.log").read_text().count("transfer") == 1


class _Fake(http.server.ThreadingHTTPServer):
    """An HTTP server answering GET/POST from ``self.reply(path) -> (status, json)``."""

    def __init__(self, reply):
        self.reply = reply

        class H(http.server.BaseHTTPRequestHandler):
            def _answer(h):
                status, obj = self.reply(h.path)
                body = json.dumps(obj).encode()
                h.send_response(status)
                h.send_header("content-type", "application/json")
                h.send_header("content-length", str(len(body)))
                h.end_headers()
                h.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(h, *a):
                pass

        super().__init__(("127.0.0.1", free_port()), H)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _workers(*entries):
    return {"workers": [{"worker_type": t, "url": u, "is_healthy": ok} for t, u, ok in entries]}


def test_router_wait_until_all_workers_listed():
    pf, dc = "http://127.0.0.1:1001", "http://127.0.0.1:1002"
    answers = iter([_workers(), _workers(("prefill", pf, True)),
                    _workers(("prefill", pf, True), ("decode", dc, False))])  # decode listed, not healthy
    final = _workers(("prefill", pf + "/", True), ("decode", dc, True))
    calls = []

    def reply(path):
        calls.append(path)
        return 200, next(answers, final)

    fake = _Fake(reply)
    try:
        wait_router_workers(fake.url, [pf], [dc], 30, [])
        assert len(calls) == 4 and set(calls) == {"/workers"}
    finally:
        fake.stop()


def test_router_wait_names_what_is_missing():
    pf, dc = "http://127.0.0.1:1001", "http://127.0.0.1:1002"
    fake = _Fake(lambda path: (200, _workers(("prefill", pf, True))))
    try:
        with pytest.raises(ClusterError, match=re.escape(f"healthy; missing: decode {dc}\n")):
            wait_router_workers(fake.url, [pf], [dc], 1.5, [])
        assert router_missing("http://127.0.0.1:1", [pf], [dc])[0].startswith("the router's")
    finally:
        fake.stop()


def test_real_router_serves_once_workers_listed(tmp_path):
    """sglang_router 0.3.2 itself, with fake workers: ``/workers`` is the registration signal."""
    served = {"model_path": "fake", "is_generation": True, "tokenizer_path": "fake", "text": "ok"}
    p_fake, d_fake = _Fake(lambda path: (200, served)), _Fake(lambda path: (200, served))
    port = free_port()
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
            "--prefill", p_fake.url, str(free_port()), "--decode", d_fake.url,
            "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(free_port())]
    router = ManagedProcess("router", argv, str(tmp_path / "router.log"), dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        router.start()
        assert router_missing(url, [p_fake.url], [d_fake.url])  # not up yet: nothing listed
        wait_router_workers(url, [p_fake.url], [d_fake.url], 120, [router])
        status, body = http_json(f"{url}/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 1}},
                                 timeout=30)
        assert status == 200, body
    finally:
        router.stop(grace_s=5)
        p_fake.stop()
        d_fake.stop()


CLUSTER_OWNER = r"""
import json, os, sys, time
import psutil
from sglang_memha.testing import PDCluster
from sglang_memha.testing.procs import http_json
model, out, logs = sys.argv[1:4]
c = PDCluster(model, ["--page-size", "16"], ["--page-size", "16"], log_dir=logs, ready="health").start()
status, body = c.generate(input_ids=[11, 12, 13], max_new_tokens=2)
kids = [k.pid for p in c.procs for k in psutil.Process(p.pid).children(recursive=True)]
json.dump({"groups": {p.name: p.pid for p in c.procs}, "children": kids, "generate": status,
           "body": str(body)[:300]}, open(out + ".tmp", "w"))
os.rename(out + ".tmp", out)
time.sleep(3600)
"""


@pytest.mark.cluster
def test_sigterm_to_cluster_owner_leaves_no_server(tiny_model, tmp_path):
    out = tmp_path / "cluster.json"
    owner = _owner(["-c", CLUSTER_OWNER, tiny_model, str(out), str(tmp_path / "logs")], tmp_path)
    pgids: set[int] = set()
    seen: set[int] = set()
    try:
        info = _wait_file(out, owner, 600)
        pgids = set(info["groups"].values())
        assert set(info["groups"]) == {"prefill", "decode", "router"}
        seen = {c.pid for c in psutil.Process(owner.pid).children(recursive=True)} | _in_groups(pgids)
        seen |= set(info["children"])
        assert info["generate"] == 200, info["body"]  # served right after start, no 503
        assert len(seen) > 3, seen  # the servers' own scheduler / detokenizer processes are in
        t0 = time.monotonic()
        owner.send_signal(signal.SIGTERM)
        assert owner.wait(timeout=60) == -signal.SIGTERM, owner.stdout.read()[-4000:]
        left = _wait_gone(seen, 30)
        assert not left, f"left running after SIGTERM: {[(p, psutil.Process(p).cmdline()) for p in left]}"
        assert not _in_groups(pgids)
        print(f"owner and {len(seen)} processes gone {time.monotonic() - t0:.1f}s after SIGTERM")
    finally:
        _kill_all(owner, pgids, seen)
