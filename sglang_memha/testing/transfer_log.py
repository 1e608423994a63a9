"""Parse the prefill's per-request transfer line (``sglang_ext/transfer/conn_bytes.py``).

One line per concluded request (WARNING level)::

  sglang-memha transfer room=R fmt=F pages=P pipelined_pages=Q kv_bytes=B total_bytes=T transfer_ms=M status=ok|failed|aborted

``pages``: KV pages the request's chunks asked to send (per decode session); ``pipelined_pages``:
those of them already delivered layer by layer during the forward (``MEMHA_PIPELINE=1``), so left
out of the send after it; ``kv_bytes``: bytes of KV rows Mooncake reported moved (a page that a
chunk boundary cut in two is shipped by both chunks' forwards, so pipelined requests can move a
page or two more than ``pages``); ``total_bytes``: plus aux metadata; ``transfer_ms``: first to last
transfer call of the request; ``status``: ``aborted`` for a room SGLang cleared without
concluding it (client abort, decode timeout or failure), logged at the next conclude.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

TRANSFER_LINE = re.compile(
    r"sglang-memha transfer room=(\d+) fmt=(\S+) pages=(\d+) pipelined_pages=(\d+) kv_bytes=(\d+) "
    r"total_bytes=(\d+) transfer_ms=([\d.]+) status=(\w+)")


@dataclass(frozen=True)
class TransferRow:
    room: int
    fmt: str
    pages: int
    pipelined_pages: int
    kv_bytes: int
    total_bytes: int
    transfer_ms: float
    status: str


def transfer_rows(log: str) -> list[TransferRow]:
    """Every transfer line in ``log``, in order."""
    return [TransferRow(int(r), f, int(p), int(q), int(b), int(t), float(m), s)
            for r, f, p, q, b, t, m, s in TRANSFER_LINE.findall(log)]
