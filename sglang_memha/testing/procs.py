"""Child processes started by PID and stopped by PID (process group), with their logs.

Every server runs in its own session (``start_new_session=True``, or ``setsid`` in a server
forked by ``zygote``) so that stopping it also stops the scheduler and detokenizer processes it
spawned; a group still there ``grace_s`` after SIGTERM gets SIGKILL, and so does a leader left
alone in its group for ``LEADER_GRACE_S``. Each start truncates its log: a reused log folder
holds this run only.

What stops the servers when their owner (this process) goes away; all of it acts on the registry
of live process groups, by PID, never by name:

- normal exit, an exception, ``KeyboardInterrupt``: ``close()`` / ``__exit__``, and ``atexit``
  for the groups still live at interpreter exit;
- SIGTERM, SIGHUP, SIGINT: while any group is live, a handler (installed by a start from the main
  thread, restored when the last group is stopped unless another handler replaced it since) stops
  every live group (SIGTERM, SIGKILL after ``SIGNAL_GRACE_S``), then hands the signal on: to the
  handler that was there before (Python's SIGINT handler raises ``KeyboardInterrupt``), or, where
  that was the default action, restores it and re-sends the signal, so the owner dies by it (a
  shell reports 128 + signum; ``atexit`` hooks do not run, as with any death by signal). A signal
  the owner ignores (``nohup``'s SIGHUP, SIGTERM set to SIG_IGN) stays ignored, except SIGINT: a
  shell starts background jobs with SIGINT ignored, and a harness has no other use for it, so it
  stops the servers and the owner dies by it;
- the owner dying by a signal it cannot catch (SIGKILL, the OOM killer): each process started from
  the main thread gets Linux ``PR_SET_PDEATHSIG`` = SIGTERM, so the kernel terminates it when the
  owner dies; SGLang's scheduler and detokenizer processes die with their server (SGLang sets
  PR_SET_PDEATHSIG on them). A process started from another thread gets no parent-death signal
  (the kernel would send it when that *thread* ends), and processes a server moves out of its
  process group are not followed.

Python runs signal handlers in the main thread between bytecodes: a main thread stuck in a long
uninterruptible C call delays the cleanup until the call returns.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from sglang_memha.testing import zygote  # before the atexit below: see zygote's imports

_LIVE: set[int] = set()  # process-group ids started here and not yet stopped


class ClusterError(RuntimeError):
    """A server could not be started or died; the message carries its log tail."""


_HANDED_OUT: set[int] = set()


def _pick_range() -> tuple[int, int]:
    """[20000, start of the kernel's ephemeral port range): no outgoing connection takes a port
    there, and Mooncake's own listeners (15000-17000 here) stay below it.

    Under pytest-xdist each worker gets its own slice (``PYTEST_XDIST_WORKER`` = ``gw<i>`` of
    ``PYTEST_XDIST_WORKER_COUNT``): ``_HANDED_OUT`` only knows this process's picks, so two
    workers drawing from one range could give two clusters the same port."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start, end = (20000, low) if low - 20000 >= 1000 else (20000, 30000)
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 1:
        width = (end - start) // int(count)
        start += int(worker[2:]) % int(count) * width
        end = start + width
    return start, end


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


def http_call(method: str, url: str, payload: dict | None = None, timeout: float = 30.0) -> tuple[int, dict | str]:
    """``method`` (``GET``, ``POST``, ``DELETE``, ...) with an optional JSON body; (status, parsed
    JSON or text). Never raises on HTTP errors; connection errors come back as status 0."""
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as e:
        return 0, str(e)
    try:
        return status, json.loads(body)
    except json.JSONDecodeError:
        return status, body


def http_json(url: str, payload: dict | None = None, timeout: float = 120.0) -> tuple[int, dict | str]:
    """POST ``payload`` (or GET when None): ``http_call``."""
    return http_call("GET" if payload is None else "POST", url, payload, timeout)


@dataclass
class ManagedProcess:
    name: str
    cmd: list[str]
    log_path: str
    env: dict[str, str]
    popen: "subprocess.Popen | zygote.ForkedServer | None" = field(default=None, repr=False)

    def start(self) -> "ManagedProcess":
        """Start the process in its own session; its log is truncated (this run's output only).
        An SGLang server is forked from the harness's zygote where that is enabled and the same
        as an exec (``zygote.start_forked``)."""
        with open(self.log_path, "wb") as log:
            self.popen = zygote.start_forked(self.cmd, self.env, self.log_path)
            if self.popen is None:
                self.popen = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                              start_new_session=True, preexec_fn=_child_setup_fn())
        _LIVE.add(self.popen.pid)
        _guard_signals()
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
        stop_all([self], grace_s)


def stop_all(procs: "list[ManagedProcess]", grace_s: float = 20.0) -> None:
    """Stop several processes at once: SIGTERM to every group together, so their shutdowns
    (SGLang sleeps ~5 s in each) overlap instead of adding up, then SIGKILL what is left."""
    live = [p for p in procs if p.popen is not None]
    _kill_groups([p.popen.pid for p in live], grace_s)
    for p in live:
        try:
            p.popen.wait(timeout=5)
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


def _reap(pgid: int) -> None:
    try:
        os.waitpid(pgid, os.WNOHANG)  # reap our direct child (the leader) so the group can vanish
    except ChildProcessError:
        pass


# An SGLang server's own process (the group leader) notices SIGTERM in a watchdog that polls every
# 5 s (``TokenizerManager.sigterm_watchdog``), then only asks its children, which got the SIGTERM
# too and release their shared memory themselves, to exit. Once the leader is alone in its group
# for this long, it gets SIGKILL: a cluster stops in ~2.5 s instead of ~7.5 s.
LEADER_GRACE_S = 1.0


def proc_stat(path: str) -> tuple[str, list[bytes]] | None:
    """``(comm, fields after comm)`` of a Linux ``/proc/<pid>[/task/<tid>]/stat`` file, None when
    it cannot be read. Fields: state, ppid, pgrp, ..., utime (index 11), stime (12)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    lp, rp = raw.index(b"("), raw.rindex(b")")
    return raw[lp + 1:rp].decode(errors="replace"), raw[rp + 2:].split()


def group_members(pgid: int) -> dict[int, list[bytes]] | None:
    """``{pid: stat fields}`` of every process in group ``pgid`` (zombies included: state
    ``b"Z"``); None where ``/proc`` cannot be listed."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    out = {}
    for entry in entries:
        if entry.isdigit() and (st := proc_stat(f"/proc/{entry}/stat")) is not None and int(st[1][2]) == pgid:
            out[int(entry)] = st[1]
    return out


def _others_in_group(pgid: int) -> bool:
    """Whether a live process other than the leader is in group ``pgid`` (True where ``/proc``
    cannot be read, so the group gets the full grace)."""
    members = group_members(pgid)
    if members is None:
        return True
    return any(pid != pgid and fields[0] != b"Z" for pid, fields in members.items())


def _kill_leader(pgid: int) -> None:
    try:
        os.kill(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill_groups(pgids, grace_s: float) -> None:
    """SIGTERM every group at once, wait up to ``grace_s`` for all to vanish, SIGKILL the rest."""
    pending = []
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
            pending.append(pgid)
        except ProcessLookupError:
            _LIVE.discard(pgid)
    start = time.monotonic()
    deadline = start + grace_s
    while pending and time.monotonic() < deadline:
        for pgid in pending:
            _reap(pgid)
        pending = [g for g in pending if _group_alive(g)]
        if pending and time.monotonic() - start > LEADER_GRACE_S:
            for pgid in pending:
                if not _others_in_group(pgid):
                    _kill_leader(pgid)
        if pending:
            time.sleep(0.2)
    for pgid in pending:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pgid in pgids:
        _LIVE.discard(pgid)
    if not _LIVE:
        _release_signals()


@atexit.register
def _kill_leftovers() -> None:
    _kill_groups(list(_LIVE), grace_s=5.0)


# --- the owner's signals ----------------------------------------------------------------------
SIGNAL_GRACE_S = 5.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PREVIOUS: dict[int, object] = {}  # signum -> its disposition before ours, while ours is installed


def _on_signal(signum: int, frame) -> None:
    """Stop every live group, then hand the signal on (see the module docstring)."""
    previous = _PREVIOUS.get(signum, signal.SIG_DFL)
    _kill_groups(list(_LIVE), grace_s=SIGNAL_GRACE_S)
    _release_signals()
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)  # SIG_DFL, or SIGINT that was ignored: die by it
    os.kill(os.getpid(), signum)


def _guard_signals() -> None:
    """Install ``_on_signal`` for SIGTERM/SIGHUP/SIGINT (main thread only; idempotent)."""
    if _PREVIOUS or threading.current_thread() is not threading.main_thread():
        return
    for signum in _SIGNALS:
        previous = signal.getsignal(signum)
        if previous is None or (previous == signal.SIG_IGN and signum != signal.SIGINT):
            continue  # installed outside Python, or deliberately ignored (nohup): leave it alone
        _PREVIOUS[signum] = previous
        signal.signal(signum, _on_signal)


def _release_signals() -> None:
    """Put back what ``_guard_signals`` replaced, where ``_on_signal`` is still the handler."""
    if not _PREVIOUS or threading.current_thread() is not threading.main_thread():
        return
    for signum, previous in list(_PREVIOUS.items()):
        if signal.getsignal(signum) is _on_signal:
            signal.signal(signum, previous)
        del _PREVIOUS[signum]


# --- parent-death signal ----------------------------------------------------------------------
_PR_SET_PDEATHSIG = 1


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def _child_setup_fn():
    """The ``preexec_fn`` of a server started from the main thread (None from other threads, or
    without prctl): in the child, between fork and exec, take back the inherited C-level handler
    of ``_on_signal``'s signals (a parent-death SIGTERM caught there would be lost before exec),
    ask for SIGTERM when the owner dies, and quit if the owner died already."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return None
    owner = os.getpid()

    def setup() -> None:
        for signum in _SIGNALS:
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, signal.SIG_DFL)
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != owner:
            os._exit(1)
    return setup


def wait_until(cond, timeout_s: float, procs: list[ManagedProcess], what, poll_s: float = 0.5):
    """Poll ``cond()`` until it returns a truthy value; fail fast if any of ``procs`` died.
    ``what`` names the awaited thing in the timeout error; a callable is called then, so that it
    can say what was still missing at the last poll."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            p.check_alive()
        value = cond()
        if value:
            return value
        time.sleep(poll_s)
    tails = "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail(20)}" for p in procs)
    what = what() if callable(what) else what
    raise ClusterError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{tails}")
