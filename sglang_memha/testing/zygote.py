"""Start SGLang servers by forking a process that has SGLang imported already (opt-in).

Why: importing ``sglang.srt.entrypoints.http_server`` costs ~17 s of CPU, and a PD cluster
starts two or three servers; on a 2-core CI box that import is about half of every cluster's
start. With ``MEMHA_ZYGOTE=1`` in the owner's environment (``tests/conftest.py`` sets it), the
harness forks each ``python -m sglang.launch_server ...`` (and the router's launcher) from
multiprocessing's fork server,
which imported SGLang once (``PRELOAD``), instead of exec'ing a fresh interpreter. Everything
after the import is SGLang's own ``launch_server`` ``__main__``, run by ``runpy``.

When a fork is *not* the same as an exec (then ``start_forked`` returns None, and the caller
uses ``subprocess.Popen``): a command other than ``-m`` one of ``SERVER_MODULES``, a network-namespace
wrapper, or an environment that differs from the fork server's in a variable read at import
time (``IMPORT_TIME_PREFIXES``: ``TRITON_INTERPRET`` decides at ``@triton.jit`` time whether
SGLang's kernels are interpreted; thread-pool sizes; the CPU engine switch, which SGLang
modules cache at import), or ``--enable-metrics`` (prometheus_client decides at import whether
it writes multiprocess files). Variables read later (``MEMHA_*``, SGLang's ``envs``, Mooncake's
``MC_*``) are set in the child before SGLang's ``main`` runs.

The forked server gets what ``ManagedProcess`` gives a Popen'ed one: its own session (stopping
the group stops its scheduler and detokenizer), its log on stdout and stderr, SIGTERM when its
parent (the fork server) dies, which it does when its owner dies.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.util  # noqa: F401  imported before procs registers its atexit: see procs
import os
import subprocess
import sys
import types

PRELOAD = ["sglang_memha.testing._zygote_preload"]
# What may be forked instead of exec'd: SGLang's server, and the router's launcher (it imports
# sglang too, ~8 s, on the critical path: the router starts after the servers are healthy).
SERVER_MODULES = ("sglang.launch_server", "sglang_router.launch_router")
IMPORT_TIME_PREFIXES = ("TRITON_", "OMP_", "MKL_", "KMP_", "TORCH", "PYTORCH_", "CUDA_",
                        "SGLANG_USE_CPU_ENGINE", "MEMHA_CPU_COMPAT", "MEMHA_CPU_FORK",
                        "PYTHONPATH", "PYTHONHASHSEED", "LD_PRELOAD", "LD_LIBRARY_PATH")

_CTX = None
_BASE_ENV: dict[str, str] | None = None


def enabled() -> bool:
    return os.environ.get("MEMHA_ZYGOTE") == "1"


def _import_time_view(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(IMPORT_TIME_PREFIXES)}


def _context(env: dict[str, str]):
    """The fork server, started on first use with ``env`` as its environment (so the preload
    imports see the servers' import-time variables); None when ``env`` differs from that."""
    global _CTX, _BASE_ENV
    if _CTX is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)  # the fork server inherits os.environ when it is exec'd
        try:
            from multiprocessing import forkserver
            forkserver.ensure_running()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        _CTX, _BASE_ENV = ctx, dict(env)
    if _import_time_view(env) != _import_time_view(_BASE_ENV):
        return None
    return _CTX


class ForkedServer:
    """The part of ``subprocess.Popen`` that ``ManagedProcess`` uses, over a forked process."""

    def __init__(self, proc, args: list[str]):
        self._proc = proc
        self.args = args
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode


def start_forked(cmd: list[str], env: dict[str, str], log_path: str) -> ForkedServer | None:
    """Fork ``cmd`` (``[python, "-m", <one of SERVER_MODULES>, *args]``) from the fork server;
    None where a fork would differ from an exec (module docstring). Called by
    ``ManagedProcess.start`` in the owner; blocks until the fork server has answered with a pid
    (the first call also waits for the preload, ~20 s)."""
    if not enabled() or cmd[:2] != [sys.executable, "-m"] or len(cmd) < 3 or cmd[2] not in SERVER_MODULES:
        return None
    if "--enable-metrics" in cmd:
        # prometheus_client picks its value class (in-process or multiprocess files) when it is
        # imported, from PROMETHEUS_MULTIPROC_DIR, which SGLang's launcher sets only later: in a
        # fork of the preloaded process the schedulers' metrics would never reach /metrics.
        return None
    ctx = _context(env)
    if ctx is None:
        return None
    proc = ctx.Process(target=_server_main, args=(cmd[2], cmd[3:], env, log_path, os.getcwd()),
                       name=os.path.basename(log_path))
    # multiprocessing re-runs the owner's main script in the child (as ``__mp_main__``) unless
    # ``__main__`` has neither a file nor a spec: a server needs none of it, and a script without
    # an ``if __name__ == "__main__"`` guard would start its work again there.
    owner_main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        sys.modules["__main__"] = owner_main
    return ForkedServer(proc, cmd)


def _server_main(module: str, args: list[str], env: dict[str, str], log_path: str, cwd: str) -> None:
    """Runs in the forked child: become a session leader, ask for SIGTERM when the fork server
    dies, point stdout and stderr at the log, take the server's environment, run SGLang's main."""
    import runpy
    import signal

    from sglang_memha.testing.procs import _PRCTL, _PR_SET_PDEATHSIG

    os.setsid()
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def helper_pids() -> set[int]:
    """The fork server's and multiprocessing's resource tracker's pids: long-lived helpers of the
    owner, not servers (a check for leftover servers skips them, not their children)."""
    if _CTX is None:
        return set()
    from multiprocessing import forkserver, resource_tracker
    pids = {forkserver._forkserver._forkserver_pid, resource_tracker._resource_tracker._pid}
    return {p for p in pids if p is not None}
