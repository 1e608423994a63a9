"""Probe for issue 5 (per-layer send): does Mooncake's transfer_sync_write release the GIL?

Command: .venv/bin/python eval/probe_mooncake_gil.py

Does Mooncake's transfer_sync_write release the GIL? Transfer 256 MB over TCP loopback in a
thread while the main thread runs pure-Python work; compare with each alone."""
import os, threading, time, torch
os.environ["MC_FORCE_TCP"] = "1"
from mooncake.engine import TransferEngine
def mk(port):
    te = TransferEngine()
    assert te.initialize(f"127.0.0.1:{port}", "P2PHANDSHAKE", "tcp", "") == 0
    return te
a, b = mk(17701), mk(17702)
N = 256 << 20
src = torch.ones(N, dtype=torch.uint8); dst = torch.zeros(N, dtype=torch.uint8)
a.register_memory(src.data_ptr(), N); b.register_memory(dst.data_ptr(), N)
peer = f"127.0.0.1:{b.get_rpc_port()}"
def xfer():
    for off in range(0, N, 16 << 20):
        assert a.transfer_sync_write(peer, src.data_ptr() + off, dst.data_ptr() + off, 16 << 20) == 0
def py_work():
    s = 0
    for i in range(3_000_000): s += i * i
    return s
def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t
def overlapped():
    th = threading.Thread(target=xfer); t = time.perf_counter(); th.start(); py_work()
    tp2 = time.perf_counter() - t; th.join(); return tp2, time.perf_counter() - t
xfer()
rows = []
for _ in range(3):
    tx, tp = timed(xfer), timed(py_work)
    tp2, tboth = overlapped()
    rows.append((tx, tp, tp2, tboth))
tx, tp, tp2, tboth = (sorted(c)[1] for c in zip(*rows))  # medians of 3
print(f"medians of 3: transfer alone {tx:.3f}s ({N/tx/1e9:.2f} GB/s); python alone {tp:.3f}s; "
      f"python while a thread transfers {tp2:.3f}s; both done {tboth:.3f}s; serial sum {tx + tp:.3f}s; "
      f"overlap ratio (both / serial) {tboth / (tx + tp):.2f}")
assert bool(dst.all()), "bytes did not arrive"
# If the GIL were held for the whole transfer, python work could not progress: both >= serial sum.
print("GIL released during transfer_sync_write" if tboth < 0.85 * (tx + tp)
      else "no overlap: the transfer holds the GIL (or the 2 cores are saturated)")
