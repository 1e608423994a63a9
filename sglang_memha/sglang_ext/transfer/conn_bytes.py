"""Measured bytes per request: the ``MemhaKVManager`` part that counts what Mooncake moved.

``_transfer_data`` is where Mooncake's ``batch_transfer_sync`` runs; the bytes of every call
that returned 0 are added to the room the transfer worker is serving (``_RoomTrackingQueue``
tells the worker thread which room that is), split into KV pages (``phase == "kv"``, set by
``MemhaKVManager.send_kvcache``) vs everything else (aux metadata, state). When the room
concludes, one log line ``sglang-memha transfer room=... fmt=... pages=... pipelined_pages=...
kv_bytes=... total_bytes=... transfer_ms=... status=...`` is written (WARNING, so it survives any
``--log-level``); ``sglang_memha.testing.transfer_log`` parses it, so its text is fixed. Rooms
SGLang cleared without a conclude get the line with ``status=aborted``.

Installed for every PD pair, with or without ``MEMHA_KV_FORMAT`` (``kv_hooks.register_metrics``),
so stock and quantized runs are measured alike; with ``--enable-metrics`` each line's figures
also go to ``/metrics`` (``sglang_ext/metrics``). Runs in SGLang's transfer worker threads and,
for ``conclude_transfer``, wherever SGLang concludes a room; a lock guards the per-room table.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from sglang_memha.sglang_ext import metrics

logger = logging.getLogger("sglang_memha")


@dataclass
class _RoomStats:
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0
    kv_bytes: int = 0
    other_bytes: int = 0
    pages: int = 0
    pipelined_pages: int = 0
    failed_calls: int = 0
    wire_fmt: str | None = None  # set when pages were converted on send (the decode's format)


class _RoomTrackingQueue:
    """Wraps a transfer worker's queue so the worker thread knows which room it serves, and how
    many tokens the chunk holds (a re-paged send writes exactly those)."""

    def __init__(self, queue, tls: threading.local):
        self._queue, self._tls = queue, tls

    def get(self, *args, **kwargs):
        chunk = self._queue.get(*args, **kwargs)
        self._tls.room = getattr(chunk, "room", None)
        self._tls.chunk_tokens = getattr(chunk, "num_kv_tokens", None)
        return chunk

    def __getattr__(self, name):
        return getattr(self._queue, name)


class ByteAccountingMixin:
    """Mixed into ``MemhaKVManager`` before SGLang's ``MooncakeKVManager`` (``super()`` is
    SGLang's). Reads ``memha_desc`` / ``memha_stock`` for the ``fmt=`` field."""

    def _init_room_stats(self) -> None:
        """From ``MemhaKVManager.__init__``, before SGLang's starts the transfer workers."""
        self._memha_tls = threading.local()
        self._memha_lock = threading.Lock()
        self._memha_rooms: dict[int, _RoomStats] = {}

    def transfer_worker(self, queue, executor, *args, **kwargs):
        return super().transfer_worker(_RoomTrackingQueue(queue, self._memha_tls), executor, *args, **kwargs)

    def _room_stats(self) -> _RoomStats | None:
        room = getattr(self._memha_tls, "room", None)
        if room is None:
            return None
        with self._memha_lock:
            return self._memha_rooms.setdefault(room, _RoomStats())

    def _transfer_data(self, mooncake_session_id, transfer_blocks):
        ret = super()._transfer_data(mooncake_session_id, transfer_blocks)
        stats = self._room_stats()
        if stats is not None and transfer_blocks:
            if ret == 0:
                moved = sum(int(b[2]) for b in transfer_blocks)
                if getattr(self._memha_tls, "phase", None) == "kv":
                    stats.kv_bytes += moved
                else:
                    stats.other_bytes += moved
            else:
                stats.failed_calls += 1
            stats.ended = time.perf_counter()
        return ret

    def _log_room(self, room: int, status: str) -> None:
        with self._memha_lock:
            stats = self._memha_rooms.pop(room, None)
        if stats is not None:
            fmt = stats.wire_fmt or metrics.format_label(self.memha_desc, self.memha_stock)
            ms = max(stats.ended - stats.started, 0.0) * 1e3
            logger.warning(
                "sglang-memha transfer room=%s fmt=%s pages=%d pipelined_pages=%d kv_bytes=%d "
                "total_bytes=%d transfer_ms=%.2f status=%s", room, fmt, stats.pages,
                stats.pipelined_pages, stats.kv_bytes, stats.kv_bytes + stats.other_bytes, ms, status)
            # The line's figures, so /metrics holds the sum of this prefill's transfer lines.
            metrics.room_concluded(fmt, stats.pages, stats.pipelined_pages, stats.kv_bytes, ms / 1e3,
                                   status == "ok")

    def _sweep_rooms(self) -> None:
        """Rooms SGLang cleared without a conclude (aborted, failed by the decode or a dead
        peer, skipped by the worker) still get their transfer line (``status=aborted``), at
        the next conclude, so the per-room stats cannot grow without bound."""
        with self._memha_lock:
            gone = [r for r in self._memha_rooms if r not in self.request_status]
        for room in gone:
            self._log_room(room, "aborted")
