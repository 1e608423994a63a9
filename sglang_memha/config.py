"""The one place that reads ``MEMHA_*`` environment variables.

| variable            | default                  | meaning                                              |
|---------------------|--------------------------|------------------------------------------------------|
| ``MEMHA_CACHE_DIR`` | ``~/.cache/sglang-memha`` | built models and downloaded wheels (outside the repo) |
| ``MEMHA_CPU_COMPAT``| ``auto``                 | ``auto``: apply CPU compat when ``SGLANG_USE_CPU_ENGINE=1``; ``0``: never; ``1``: always |
| ``MEMHA_CPU_KERNELS``| ``1``                   | ``0``: never build/use the fused C codec kernels (torch reference only) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass

_CPU_COMPAT_VALUES = ("auto", "0", "1")


@dataclass(frozen=True)
class MemhaConfig:
    cache_dir: str
    cpu_compat: str  # one of _CPU_COMPAT_VALUES
    cpu_kernels: bool = True

    def __post_init__(self) -> None:
        if self.cpu_compat not in _CPU_COMPAT_VALUES:
            raise ValueError(f"MEMHA_CPU_COMPAT={self.cpu_compat!r}: expected one of {_CPU_COMPAT_VALUES}")

    @property
    def cpu_compat_enabled(self) -> bool:
        if self.cpu_compat == "auto":
            # SGLang's own switch for its CPU engine (sglang.srt.utils.common.is_cpu).
            return os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1"
        return self.cpu_compat == "1"


def load_config() -> MemhaConfig:
    return MemhaConfig(
        cache_dir=os.environ.get("MEMHA_CACHE_DIR") or os.path.expanduser("~/.cache/sglang-memha"),
        cpu_compat=os.environ.get("MEMHA_CPU_COMPAT", "auto"),
        cpu_kernels=_flag("MEMHA_CPU_KERNELS", True),
    )


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def cache_dir() -> str:
    path = load_config().cache_dir
    os.makedirs(path, exist_ok=True)
    return path
