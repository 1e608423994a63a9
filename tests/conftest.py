"""Shared fixtures. Cluster tests start real SGLang servers on CPU (marker ``cluster``).

The suite runs on two pytest-xdist workers (``pyproject.toml``). A test marked ``exclusive``
(it measures a rate, so a busy neighbour would bend its figure) runs with the other worker
paused between its tests: every test holds a shared lock, an exclusive one takes it alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile

import pytest

# Servers fork from a process that has SGLang imported (sglang_memha/testing/zygote.py): ~17 s
# of CPU less per server start.
os.environ.setdefault("MEMHA_ZYGOTE", "1")
# One torch thread per process, servers included (they inherit it): two workers each run a cluster
# of two or three servers on 2 cores, and a server's 2-thread OpenMP regions then wait at every
# barrier for a thread the scheduler descheduled (a PD decode stepped SmolLM2 at ~1 token/s in
# the full suite, against ~11 alone). Set before torch is imported; an explicit value wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "exclusive: measures a rate; no other test runs beside it")


def pytest_unconfigure(config):
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller (or a run without xdist)
        for suffix in (".gate", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_lock_base(os.getpid()) + suffix)


def _lock_base(controller_pid: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"memha-pytest-{controller_pid}")


@contextlib.contextmanager
def _flock(path: str, mode: int):
    with open(path, "a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist: a shared lock around each test's set-up, call and tear-down (module fixtures
    included), an exclusive one around ``exclusive`` tests. The gate file is a turnstile: an
    exclusive test waiting for the lock holds the gate, so the other worker cannot take a new
    shared lock and starve it (flock has no writer preference). No-op in one process."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    base = _lock_base(os.getppid())  # the workers' parent: the xdist controller
    mode = fcntl.LOCK_EX if item.get_closest_marker("exclusive") else fcntl.LOCK_SH
    with contextlib.ExitStack() as held:
        with _flock(base + ".gate", mode):
            held.enter_context(_flock(base + ".lock", mode))
        yield


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from sglang_memha.models.tiny_qwen3 import build

    return build()


def descendants() -> list:
    """Live processes started (transitively) by this test process, less the harness's fork server
    and resource tracker (their children, the forked servers, still count)."""
    import psutil

    from sglang_memha.testing import zygote

    helpers = zygote.helper_pids()
    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and p.pid not in helpers]
