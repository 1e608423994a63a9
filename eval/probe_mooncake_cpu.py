"""Probe for issue 5: how much CPU does a Mooncake TCP transfer burn while it waits on a slow link?

Command: .venv/bin/python eval/probe_mooncake_cpu.py [--rate 100mbit] [--mbytes 32]   (root)

A receiver engine in the decode namespace of a shaped link, a sender in the prefill namespace;
the sender writes ``--mbytes`` once with ``batch_transfer_sync_write`` and once with
``batch_transfer_async_write`` polled every 1 ms, and prints wall time and the sender process's
CPU time (all threads). CPU ~= wall means a core is busy for the whole transfer, whatever the
caller does while it waits -- on a 2-core testbed that core is taken from the prefill forward.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("MC_FORCE_TCP", "1")


def engine(ip: str, nbytes: int):
    import torch
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    if te.initialize(ip, "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit(f"Mooncake initialize failed on {ip}")
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    te.register_memory(buf.data_ptr(), nbytes)
    return te, buf


def receiver(ip: str, nbytes: int) -> None:
    te, buf = engine(ip, nbytes)
    print(json.dumps({"session": f"{ip}:{te.get_rpc_port()}", "ptr": buf.data_ptr()}), flush=True)
    sys.stdin.read()  # until the parent closes stdin


def sender(ip: str, nbytes: int, peer: dict) -> None:
    te, buf = engine(ip, nbytes)
    for mode in ("sync", "async, polled every 1 ms"):
        t0, c0 = time.perf_counter(), time.process_time()
        if mode == "sync":
            ret = te.batch_transfer_sync_write(peer["session"], [buf.data_ptr()], [peer["ptr"]], [nbytes])
        else:
            bid = te.batch_transfer_async_write(peer["session"], [buf.data_ptr()], [peer["ptr"]], [nbytes])
            while (ret := te.get_batch_transfer_status([bid])) > 0:  # 0 done, < 0 failed
                time.sleep(0.001)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"mode": mode, "status": ret, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
                          "cpu_per_wall": round(cpu / wall, 2), "MB_per_s": round(nbytes / wall / 1e6, 1)}),
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="100mbit")
    ap.add_argument("--mbytes", type=int, default=32)
    ap.add_argument("--role", choices=["recv", "send"], help=argparse.SUPPRESS)
    ap.add_argument("--ip", help=argparse.SUPPRESS)
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    a = ap.parse_args()
    nbytes = a.mbytes << 20
    if a.role == "recv":
        return receiver(a.ip, nbytes)
    if a.role == "send":
        return sender(a.ip, nbytes, json.loads(a.peer))
    from sglang_memha.testing.netns import ShapedLink, netns_available, ns_cmd

    ok, why = netns_available()
    if not ok:
        sys.exit(f"needs network namespaces: {why}")
    me = [sys.executable, os.path.abspath(__file__), "--mbytes", str(a.mbytes)]
    with ShapedLink(rate=a.rate, prefix="memhapr") as link:
        recv = subprocess.Popen(ns_cmd(link.decode_ns, [*me, "--role", "recv", "--ip", link.decode_ip]),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            peer = next(line for line in recv.stdout if line.startswith("{"))
            out = subprocess.run(ns_cmd(link.prefill_ns, [*me, "--role", "send", "--ip", link.prefill_ip,
                                                          "--peer", peer.strip()]),
                                 capture_output=True, text=True, timeout=600)
            print(f"link {a.rate}, {a.mbytes} MB")
            print("\n".join(line for line in out.stdout.splitlines() if line.startswith("{")) or out.stderr[-2000:])
        finally:
            recv.stdin.close()
            recv.wait(timeout=30)


if __name__ == "__main__":
    main()
