"""Shared fixtures. Cluster tests start real SGLang servers on CPU (marker ``cluster``)."""
from __future__ import annotations

import os

import pytest

# Servers fork from a process that has SGLang imported (sglang_memha/testing/zygote.py): ~17 s
# of CPU less per server start.
os.environ.setdefault("MEMHA_ZYGOTE", "1")


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
