"""Child processes started by PID and stopped by PID (process group), with their logs.

Every server runs in its own session (``start_new_session=True``) so that stopping it also
stops the scheduler and detokenizer processes it spawned; a process that ignores SIGTERM for
``grace_s`` gets SIGKILL. A registry of live groups is killed ``atexit`` as a last resort, so an
interrupted test leaves no process behind.
"""
from __future__ import annotations

import atexit
import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

_LIVE: set[int] = set()  # process-group ids started here and not yet stopped


class ClusterError(RuntimeError):
    """A server could not be started or died; the message carries its log tail."""


_HANDED_OUT: set[int] = set()


def _pick_range() -> tuple[int, int]:
    """[20000, start of the kernel's ephemeral port range): no outgoing connection takes a port
    there, and Mooncake's own listeners (15000-17000 here) stay below it."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return (20000, low) if low - 20000 >= 1000 else (20000, 30000)


_PICK_RANGE = _pick_range()
_rng = random.Random()


def free_port() -> int:
    """A port free now, not handed out before by this process, and outside the ephemeral range.

    A cluster picks its ports before any server binds one, so two races matter: the kernel gives
    the same free port to two binds in a row once the first socket closes (a full-suite run here
    saw a router and a prefill get the same port), and an outgoing connection can take an
    ephemeral port between the pick and the bind (another run saw a prefill's HTTP port taken).
    Picking from ``_PICK_RANGE`` and remembering what was handed out avoids both."""
    low, high = _PICK_RANGE
    for _ in range(500):
        port = _rng.randrange(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise ClusterError(f"no free port in [{low}, {high}) that this process has not handed out already")


def check_port_free(port: int, what: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise ClusterError(f"{what} port {port} is already in use ({e.strerror}): "
                               f"stop what listens there or pass another port (0 = pick a free one)") from None


def http_json(url: str, payload: dict | None = None, timeout: float = 120.0) -> tuple[int, dict | str]:
    """POST ``payload`` (or GET when None); return (status, parsed JSON or text). Never raises on
    HTTP errors; connection errors come back as status 0."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read().decode()
            status = r.status
    except urllib.error.HTTPError as e:
        body, status = e.read().decode(errors="replace"), e.code
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as e:
        return 0, str(e)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


@dataclass
class ManagedProcess:
    name: str
    cmd: list[str]
    log_path: str
    env: dict[str, str]
    popen: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> "ManagedProcess":
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                      start_new_session=True)
        log.close()
        _LIVE.add(self.popen.pid)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if not self.alive():
            code = self.popen.returncode if self.popen else None
            raise ClusterError(f"{self.name} exited with code {code} (log {self.log_path}):\n"
                               f"{self.log_tail()}")

    def stop(self, grace_s: float = 20.0) -> None:
        if self.popen is None:
            return
        _kill_group(self.popen.pid, grace_s)
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _kill_group(pgid: int, grace_s: float) -> None:
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        _LIVE.discard(pgid)
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.waitpid(pgid, os.WNOHANG)  # reap our direct child so the group can vanish
        except ChildProcessError:
            pass
        if not _group_alive(pgid):
            break
        time.sleep(0.2)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _LIVE.discard(pgid)


@atexit.register
def _kill_leftovers() -> None:
    for pgid in list(_LIVE):
        _kill_group(pgid, grace_s=5.0)


def wait_until(cond, timeout_s: float, procs: list[ManagedProcess], what: str, poll_s: float = 0.5):
    """Poll ``cond()`` until it returns a truthy value; fail fast if any of ``procs`` died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        value = cond()
        if value:
            return value
        time.sleep(poll_s)
    tails = "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail(20)}" for p in procs)
    raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tails}")
