"""The pipeline's per-layer "KV written" marker: when may a sender thread read layer L's pages?

On CPU the pool's writes are finished when ``set_kv_buffer`` returns, so the marker is ready at
once. On a GPU ``set_kv_buffer`` only *enqueues* the quantize-on-write kernel on the forward's
stream; a transfer engine reading those pages from another thread (Mooncake reads device memory
directly, outside any CUDA stream) would read stale bytes. So the scheduler thread records a
CUDA event on the current stream right after the layer's writes were enqueued (never blocks),
and the sender thread waits on that event (blocking itself only, the GIL released) before it
hands the layer's pages to Mooncake. Events on one stream complete in order, so waiting on the
newest marker of a coalesced group covers the older ones too.

No SGLang import (unit-testable on a GPU host without a server).
"""
from __future__ import annotations

import torch


class LayerWritten:
    """Marker of one layer's writes. ``event``: a ``torch.cuda.Event`` recorded after the
    writes, or None when they are already complete (CPU)."""

    __slots__ = ("layer", "event")

    def __init__(self, layer: int, event: "torch.cuda.Event | None" = None):
        self.layer, self.event = layer, event

    @classmethod
    def record(cls, layer: int, device: torch.device | str | None) -> "LayerWritten | None":
        """Called by ``BatchPlan.layer_written`` (scheduler thread, inside ``set_kv_buffer``,
        once per layer per forward); never blocks. Returns None while a CUDA graph is being
        captured: a marker recorded then would fire at capture, not at replay, so that layer is
        left unsignalled and its pages go by the whole-request send (``LayerPipeline.claim``)."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        if device.type != "cuda":
            return cls(layer)
        if torch.cuda.is_current_stream_capturing():
            return None
        # blocking=True: the waiting sender thread sleeps instead of spinning a host core
        event = torch.cuda.Event(blocking=True)
        event.record(torch.cuda.current_stream(device))
        return cls(layer, event)

    def ready(self) -> bool:
        """Non-blocking: have the layer's writes completed?"""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Called by the sender thread before reading the layer's pages; blocks that thread until
        the writes completed (returns at once on CPU)."""
        if self.event is not None:
            self.event.synchronize()
