"""Shared fixtures. Cluster tests start real SGLang servers on CPU (marker ``cluster``)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from sglang_memha.models.tiny_qwen3 import build

    return build()


def descendants() -> list:
    """Live processes started (transitively) by this test process."""
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
