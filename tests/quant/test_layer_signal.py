"""The pipeline's per-layer marker: ready at once on CPU; on a GPU a CUDA event that a sender
thread must wait on before reading pages a kernel is still writing."""
from __future__ import annotations

import threading

import pytest
import torch

from sglang_memha.sglang_ext.transfer.layer_signal import LayerWritten


def test_cpu_marker_is_ready_at_once():
    m = LayerWritten.record(3, "cpu")
    assert m.layer == 3 and m.event is None and m.ready()
    m.wait()  # returns at once
    assert LayerWritten.record(0, None).ready()


def _read_on_other_thread(buf: torch.Tensor, marker: LayerWritten | None) -> torch.Tensor:
    """What a reader outside the writer's stream sees: a copy on its own non-blocking stream
    (as Mooncake's reads are ordered with no CUDA stream of the forward)."""
    out = {}

    def run():
        if marker is not None:
            marker.wait()
        side = torch.cuda.Stream(device=buf.device)
        host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
        with torch.cuda.stream(side):
            host.copy_(buf, non_blocking=True)
        side.synchronize()
        out["v"] = host

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    return out["v"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_marker_orders_a_reader_after_the_writes():
    dev = torch.device("cuda")
    writer = torch.cuda.Stream(device=dev)
    results = {}
    for waits in (False, True):
        buf = torch.zeros(1 << 20, dtype=torch.uint8, device=dev)
        torch.cuda.synchronize()
        with torch.cuda.stream(writer):
            torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time before the "layer's writes"
            buf.fill_(7)
            marker = LayerWritten.record(5, dev)
        assert marker.event is not None and not marker.ready()  # the writes are still queued
        results[waits] = _read_on_other_thread(buf, marker if waits else None)
        writer.synchronize()
        assert marker.ready()
    # Control: without the wait the reader sees the bytes before the kernel wrote them, so the
    # assertion below can fail; with it, every byte is the written one.
    assert not bool((results[False] == 7).all())
    assert bool((results[True] == 7).all())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_marker_during_cuda_graph_capture():
    dev = torch.device("cuda")
    x = torch.zeros(16, device=dev)
    graph = torch.cuda.CUDAGraph()
    got = []
    s = torch.cuda.Stream(device=dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        x.add_(1)  # warm-up outside capture
    torch.cuda.current_stream(dev).wait_stream(s)
    with torch.cuda.graph(graph):
        x.add_(1)
        got.append(LayerWritten.record(0, dev))
    assert got == [None]
