"""Per-process state shared by the pool and the PD manager: this scheduler's KV descriptor.

One SGLang scheduler process owns one KV pool (one TP/PP rank), so a module-level slot is
enough. The pool side sets it when it allocates (``MemhaQuantKVPool``, or
``pool/stock_pool.describe_stock_pool`` for a prefill on SGLang's own pool); ``MemhaKVManager`` reads
it when SGLang creates the PD manager (after the pool, in the same process).
"""
from __future__ import annotations

from sglang_memha.kvformat import FormatDescriptor

_local: FormatDescriptor | None = None
_stock = False
_pool = None


def set_local_descriptor(desc: FormatDescriptor, pool=None, stock: bool = False) -> None:
    """``pool``: the KV pool the descriptor describes (the sender converts from its tensors);
    ``stock``: SGLang's own pool, described so a memha decode can be fed (a decode without a
    descriptor is then served the stock way, not refused)."""
    global _local, _stock, _pool
    _local, _stock, _pool = desc, stock, pool


def local_descriptor() -> FormatDescriptor | None:
    return _local


def local_is_stock() -> bool:
    return _stock


def local_pool():
    return _pool
