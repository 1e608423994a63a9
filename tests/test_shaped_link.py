"""The shaped prefill <-> decode link (scripts/shaped_link.sh via sglang_memha.testing.netns).

Needs root: everything here is skipped, with the reason, where ``ip netns add`` is refused.
Rates are TCP payload over a link shaped in wire bytes: at MTU 1500 the Ethernet, IP and TCP
headers take 4.4 %, so a perfectly link-bound stream reads ~95.6 % of the shaped rate.
Every process is started with ManagedProcess and stopped by PID; the module's link is torn down
(and checked gone) even when a test fails.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from sglang_memha.testing.netns import NetnsError, ShapedLink, netns_available, ns_cmd, parse_rate
from sglang_memha.testing.procs import ManagedProcess, wait_until

# Own prefix and subnet, so a link someone set up with the defaults is left alone.
PREFIX, SUBNET = "memhat", "10.231.0"
TCP_TOLERANCE = 0.15       # plain TCP payload rate within +-15 % of the shaped rate
MOONCAKE_TOLERANCE = 0.20  # Mooncake TCP payload rate within +-20 % of the shaped rate

# Receiver: accept one connection, count bytes from the first recv to EOF, print the rate.
RECV = r"""
import json, socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, peer = s.accept(); buf = bytearray(1 << 20); n = 0; t0 = None
while k := c.recv_into(buf):
    if t0 is None: t0 = time.perf_counter()
    else: n += k
dt = time.perf_counter() - t0
print(json.dumps({"peer": peer[0], "bytes": n, "s": dt, "bps": n * 8 / dt}), flush=True)
"""
SEND = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); chunk = b"x" * (1 << 20)
for _ in range(int(sys.argv[3]) >> 20): c.sendall(chunk)
c.close()
"""
# Mooncake over TCP, P2P handshake, as SGLang's PD path uses it. The target registers a zeroed
# buffer and publishes its session id and address; the initiator writes a pattern into it
# (16 MiB warm-up incl. handshake, then timed 16 MiB writes) and prints rate and digest; the
# target prints the digest of what arrived once the test touches <dir>/done.
MOONCAKE = r"""
import hashlib, json, os, sys, time
import numpy as np
from mooncake.engine import TransferEngine
role, ip, d, total = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
te = TransferEngine()
assert te.initialize(ip, "P2PHANDSHAKE", "tcp", "") == 0, "initialize failed"
if role == "target":
    buf = np.zeros(total, dtype=np.uint8)
    assert te.register_memory(buf.ctypes.data, total) == 0
    with open(f"{d}/target.tmp", "w") as f:
        json.dump({"session": f"{ip}:{te.get_rpc_port()}", "addr": buf.ctypes.data}, f)
    os.rename(f"{d}/target.tmp", f"{d}/target.json")
    while not os.path.exists(f"{d}/done"): time.sleep(0.05)
    print("RESULT " + json.dumps({"digest": hashlib.blake2b(buf).hexdigest()}), flush=True)
else:
    info = json.load(open(f"{d}/target.json"))
    src = (np.arange(total, dtype=np.uint32) % 251).astype(np.uint8)
    assert te.register_memory(src.ctypes.data, total) == 0
    step = 16 << 20
    def write(off):
        rc = te.transfer_sync_write(info["session"], src.ctypes.data + off, info["addr"] + off, step)
        assert rc == 0, f"transfer_sync_write rc={rc}"
    write(0)
    t = time.perf_counter()
    for off in range(step, total, step): write(off)
    dt = time.perf_counter() - t
    print("RESULT " + json.dumps({"bytes": total - step, "s": dt, "bps": (total - step) * 8 / dt,
                                  "digest": hashlib.blake2b(src).hexdigest()}), flush=True)
"""


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _leftovers(prefix: str) -> list[str]:
    names = {f"{prefix}-p", f"{prefix}-d"}
    return sorted(names & _netns_names()) + sorted(names & _root_links())


@pytest.fixture(scope="module")
def netns() -> None:
    ok, why = netns_available()
    if not ok:
        pytest.skip(f"shaped link needs network namespaces: {why}")


@pytest.fixture(scope="module")
def link(netns):
    sl = ShapedLink(rate="1gbit", prefix=PREFIX, subnet=SUBNET)
    try:
        yield sl.up()
    finally:
        sl.down()
        assert not _leftovers(PREFIX), f"left behind after down: {_leftovers(PREFIX)}"


def _proc(tmp_path, name: str, ns: str, code: str, *args: str, env: dict | None = None) -> ManagedProcess:
    return ManagedProcess(name, ns_cmd(ns, [sys.executable, "-c", code, *args]),
                          str(tmp_path / f"{name}.log"), env or dict(os.environ)).start()


def _wait_exit(p: ManagedProcess, timeout_s: float) -> None:
    wait_until(lambda: not p.alive(), timeout_s, [], f"{p.name} to finish")
    assert p.popen.returncode == 0, f"{p.name} exited {p.popen.returncode}:\n{p.log_tail()}"


def _in(ns: str | None, argv: list[str]) -> list[str]:
    return argv if ns is None else ns_cmd(ns, argv)


def _tcp_rate(tmp_path, tag: str, dst_ns: str | None, dst_ip: str, src_ns: str | None, nbytes: int) -> dict:
    """One TCP stream of ``nbytes`` from ``src_ns`` to ``dst_ip`` in ``dst_ns`` (None: the root namespace)."""
    port = 5201
    recv = ManagedProcess(f"recv-{tag}", _in(dst_ns, [sys.executable, "-c", RECV, dst_ip, str(port)]),
                          str(tmp_path / f"recv-{tag}.log"), dict(os.environ)).start()
    procs = [recv]
    try:
        wait_until(lambda: "listening" in recv.log_tail(), 20, procs, "receiver to listen")
        send_argv = [sys.executable, "-c", SEND, dst_ip, str(port), str(nbytes)]
        send = ManagedProcess(f"send-{tag}", _in(src_ns, send_argv),
                              str(tmp_path / f"send-{tag}.log"), dict(os.environ)).start()
        procs.append(send)
        _wait_exit(send, 60)
        _wait_exit(recv, 10)
        return json.loads(recv.log_tail().strip().splitlines()[-1])
    finally:
        for p in procs:
            p.stop(grace_s=2)


def test_parse_rate():
    assert parse_rate("500mbit") == 500_000_000
    assert parse_rate("1Gbit") == 10**9
    assert parse_rate("1.5gbit") == 1_500_000_000
    with pytest.raises(ValueError, match="rate='1gbps'"):
        parse_rate("1gbps")


def test_up_is_idempotent_and_down_leaves_nothing(netns, tmp_path):
    prefix = "memhau"
    sl = ShapedLink(rate="200mbit", prefix=prefix, subnet="10.232.0")
    stray = None
    try:
        sl.up()
        sl.up()  # tears the first one down first
        assert {f"{prefix}-p", f"{prefix}-d"} <= _netns_names()
        assert "rate=200Mbit" in sl.status()
        assert (sl.prefill_ip, sl.decode_ip, sl.host_ip) == ("10.232.0.1", "10.232.0.2", "10.232.0.254")
        # a process left inside is stopped by down (it would sit on a deleted network)
        stray = _proc(tmp_path, "stray", sl.prefill_ns, "import time; time.sleep(600)")
        sl.down()
        wait_until(lambda: not stray.alive(), 10, [], "the stray process to be stopped by down")
    finally:
        sl.down()
        if stray is not None:
            stray.stop(grace_s=2)
    assert not _leftovers(prefix)
    with pytest.raises(NetnsError, match="not up"):
        sl.status()
    with pytest.raises(NetnsError, match="not up"):
        sl.prefill_ip


def test_root_reaches_both_namespaces(link, tmp_path):
    procs = [ManagedProcess(f"http-{ns}", ns_cmd(ns, [sys.executable, "-m", "http.server", "8123", "--bind",
                                                    "0.0.0.0", "--directory", str(tmp_path)]),
                            str(tmp_path / f"http-{ns}.log"), dict(os.environ)).start()
             for ns in (link.prefill_ns, link.decode_ns)]
    try:
        for ip in (link.prefill_ip, link.decode_ip):
            def fetch(ip=ip):
                try:
                    with urllib.request.urlopen(f"http://{ip}:8123/", timeout=2) as r:
                        return r.status
                except OSError:
                    return None
            assert wait_until(fetch, 20, procs, f"http://{ip}:8123/ from the root namespace") == 200
        # lo is up inside the namespaces: the server answers on 127.0.0.1 there
        code = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:8123/', timeout=5).status)"
        for ns in (link.prefill_ns, link.decode_ns):
            out = subprocess.run(ns_cmd(ns, [sys.executable, "-c", code]), capture_output=True,
                                 text=True, timeout=30)
            assert out.stdout.strip() == "200", out.stderr
    finally:
        for p in procs:
            p.stop(grace_s=2)


@pytest.mark.exclusive
@pytest.mark.parametrize("rate,direction,mbytes", [
    ("200mbit", "prefill->decode", 50), ("200mbit", "decode->prefill", 50), ("1gbit", "prefill->decode", 50)])
def test_tcp_between_namespaces_is_link_bound(link, tmp_path, rate, direction, mbytes):
    link.set_rate(rate)
    if direction == "prefill->decode":
        src_ns, dst_ns, dst_ip = link.prefill_ns, link.decode_ns, link.decode_ip
    else:
        src_ns, dst_ns, dst_ip = link.decode_ns, link.prefill_ns, link.prefill_ip
    before = link.sent_bytes()
    r = _tcp_rate(tmp_path, direction.replace("->", "-"), dst_ns, dst_ip, src_ns, mbytes << 20)
    after = link.sent_bytes()
    shaped = parse_rate(rate)
    ratio = r["bps"] / shaped
    print(f"{direction} at {rate}: {r['bps'] / 1e6:.1f} Mbit/s payload = {ratio:.3f} of the shaped rate")
    assert abs(ratio - 1) <= TCP_TOLERANCE, f"{direction} at {rate}: {r} not within 15 % of {shaped} bit/s"
    # the bytes crossed the shaped link, in the sender's tbf
    wire = after[0] - before[0] if direction == "prefill->decode" else after[1] - before[1]
    assert wire >= r["bytes"], f"tbf on the sender's side counted {wire} bytes for {r['bytes']} sent"


@pytest.mark.exclusive
@pytest.mark.parametrize("direction", ["root->prefill", "decode->root"])
def test_root_namespace_traffic_is_not_shaped(link, tmp_path, direction):
    link.set_rate("1gbit")
    if direction == "root->prefill":
        r = _tcp_rate(tmp_path, "root-p", link.prefill_ns, link.prefill_ip, None, 200 << 20)
        assert r["peer"] == link.host_ip
    else:
        r = _tcp_rate(tmp_path, "d-root", None, link.host_ip, link.decode_ns, 200 << 20)
        assert r["peer"] == link.decode_ip
    print(f"{direction} with the link at 1gbit: {r['bps'] / 1e9:.2f} Gbit/s")
    assert r["bps"] > 3 * parse_rate("1gbit"), f"{direction} looks shaped: {r}"


def test_managed_process_in_namespace_is_stopped_with_its_children(link, tmp_path):
    """``ip netns exec`` execs: the PID is python's, in the namespace, and stop() kills its group."""
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(600)']); print('child', c.pid, flush=True); time.sleep(600)")
    p = _proc(tmp_path, "in-ns", link.prefill_ns, code)
    try:
        child = int(wait_until(lambda: next((ln.split()[1] for ln in p.log_tail().splitlines()
                                             if ln.startswith("child ")), None), 20, [p], "the child"))
        assert os.path.realpath(f"/proc/{p.pid}/exe") == os.path.realpath(sys.executable)
        netns_ino = os.stat(f"/run/netns/{link.prefill_ns}").st_ino
        for pid in (p.pid, child):
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns_ino, f"pid {pid} is not in {link.prefill_ns}"
    finally:
        p.stop(grace_s=5)
    assert not p.alive()

    def child_gone():
        try:
            with open(f"/proc/{child}/stat") as f:
                return f.read().split(")")[-1].split()[0] == "Z"  # a zombie awaiting its reaper is gone
        except FileNotFoundError:
            return True
    wait_until(child_gone, 10, [], f"child {child} to be stopped with its group")


def test_sglang_detects_the_namespace_ip(link):
    """SGLang's get_local_ip_auto (Mooncake hostname, KV-manager ZMQ bind) finds the namespace's IP
    through the default route; SGLANG_HOST_IP (``server_env``) overrides it."""
    code = ("import os; from sglang.srt.utils.network import get_local_ip_auto; print(get_local_ip_auto()); "
            "os.environ.update(SGLANG_HOST_IP=sys.argv[1]); print(get_local_ip_auto())")
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_HOST_IP", "HOST_IP")}
    out = subprocess.run(ns_cmd(link.decode_ns, [sys.executable, "-c", "import sys; " + code, "10.9.9.9"]),
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == [link.decode_ip, "10.9.9.9"]
    assert link.server_env(link.prefill_ip, env)["SGLANG_HOST_IP"] == link.prefill_ip


@pytest.mark.exclusive
def test_mooncake_tcp_is_link_bound(link, tmp_path):
    rate, total = "500mbit", 80 << 20  # 16 MiB warm-up + 64 MiB timed (~1.1 s at 500mbit)
    link.set_rate(rate)
    env = {**os.environ, "MC_FORCE_TCP": "1"}
    before = link.sent_bytes()
    target = _proc(tmp_path, "mc-target", link.decode_ns, MOONCAKE, "target", link.decode_ip,
                   str(tmp_path), str(total), env=env)
    procs = [target]
    try:
        wait_until(lambda: (tmp_path / "target.json").exists(), 60, procs, "the Mooncake target")
        init = _proc(tmp_path, "mc-initiator", link.prefill_ns, MOONCAKE, "initiator", link.prefill_ip,
                     str(tmp_path), str(total), env=env)
        procs.append(init)
        _wait_exit(init, 60)
        (tmp_path / "done").touch()
        _wait_exit(target, 30)
    finally:
        for p in procs:
            p.stop(grace_s=2)

    def result(p):
        return json.loads(next(ln[7:] for ln in p.log_tail(200).splitlines() if ln.startswith("RESULT ")))
    sent, got = result(init), result(target)
    assert got["digest"] == sent["digest"], "bytes arrived differently from what was written"
    shaped = parse_rate(rate)
    ratio = sent["bps"] / shaped
    print(f"Mooncake TCP prefill->decode at {rate}: {sent['bps'] / 1e6:.1f} Mbit/s = {ratio:.3f} of the rate")
    assert abs(ratio - 1) <= MOONCAKE_TOLERANCE, f"Mooncake at {rate}: {sent} not within 20 % of {shaped} bit/s"
    assert link.sent_bytes()[0] - before[0] >= total, "the Mooncake bytes did not cross the shaped link"
