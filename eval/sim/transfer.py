"""KV transfer model: one link per prefill instance, FIFO, bandwidth + latency + per-slice overhead.

A request's KV is ``tokens * kv_bytes_per_token_layer(wire format)`` per layer. Two schedules:

* whole-request (stock SGLang when the prompt fits one chunk): the transfer starts when prefill
  ends (and the link is free) and lasts ``latency + bytes / bw + slices * slice_overhead``.
* per-layer pipelined: the request's KV goes out as n = layers x chunks equal slices; the first
  is ready one layer-time after its first prefill batch starts, and slices go out in order as
  the link allows. With ``s = bytes / n / bw + slice_overhead`` seconds per slice the last lands at

      max(prefill_end + s, link_start + n * s) + latency,   link_start = max(link_free, first_ready)

  (the link either keeps up with compute, so only the last slice is exposed, or it is the
  bottleneck and runs back-to-back from the first ready slice).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Link:
    """A point-to-point KV path. ``gbps`` is payload bandwidth in Gbit/s."""

    gbps: float
    latency_s: float = 0.0
    slice_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.gbps > 0:
            raise ValueError(f"Link.gbps={self.gbps!r} is not valid: expected > 0")
        if self.latency_s < 0 or self.slice_overhead_s < 0:
            raise ValueError(f"Link latency_s={self.latency_s!r} / slice_overhead_s={self.slice_overhead_s!r}: "
                             "expected >= 0")

    @property
    def bytes_per_s(self) -> float:
        return self.gbps * 1e9 / 8


def whole_transfer(link: Link, nbytes: float, ready: float, link_free: float, n_slices: int = 1) -> tuple[float, float]:
    """Whole-request transfer. Returns (arrival time at decode, time the link becomes free)."""
    start = max(ready, link_free)
    busy = nbytes / link.bytes_per_s + n_slices * link.slice_overhead_s
    return start + busy + link.latency_s, start + busy


def pipelined_transfer(link: Link, nbytes: float, first_ready: float, prefill_end: float,
                       n_slices: int, link_free: float) -> tuple[float, float]:
    """Per-layer transfer overlapping prefill. Returns (arrival time at decode, link free time).

    ``n_slices`` = layers x prefill chunks of the request; ``first_ready`` = when its first slice
    (layer 0 of its first chunk) exists.
    """
    s = nbytes / n_slices / link.bytes_per_s + link.slice_overhead_s
    start = max(link_free, first_ready)
    end = max(prefill_end + s, start + n_slices * s)
    return end + link.latency_s, end
