"""Per-process state shared by the pool and the PD manager: this scheduler's KV descriptor.

One SGLang scheduler process owns one KV pool (one TP/PP rank), so a module-level slot is
enough. ``MemhaQuantKVPool`` sets it when it allocates; ``MemhaKVManager`` reads it when SGLang
creates the PD manager (after the pool, in the same process).
"""
from __future__ import annotations

from sglang_memha.kvformat import FormatDescriptor

_local: FormatDescriptor | None = None


def set_local_descriptor(desc: FormatDescriptor) -> None:
    global _local
    _local = desc


def local_descriptor() -> FormatDescriptor | None:
    return _local
