"""Bad input to the cluster launcher: a clear message naming the problem and its fix, and no
orphan processes (every process this test process started is gone afterwards)."""
from __future__ import annotations

import socket

import pytest

from sglang_memha.testing import ClusterError, PDCluster, SingleServer
from tests.conftest import descendants

pytestmark = pytest.mark.cluster


def test_missing_model_path(tmp_path):
    with pytest.raises(ClusterError, match="has no config.json: build the tiny model"):
        with PDCluster(str(tmp_path / "nope"), log_dir=str(tmp_path)):
            pass
    assert descendants() == []


def test_router_port_in_use(tiny_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ClusterError, match=f"router port {port} is already in use"):
            with PDCluster(tiny_model, router_port=port, log_dir=str(tmp_path)):
                pass
    assert descendants() == []


def test_decode_without_reachable_prefill(tiny_model, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: connection refused
        with pytest.raises(ClusterError, match="prefill server at .* is not reachable"):
            with PDCluster(tiny_model, prefill_url=(f"http://127.0.0.1:{dead}", 1),
                           log_dir=str(tmp_path)):
                pass
    assert descendants() == []


def test_server_that_dies_reports_its_log(tiny_model, tmp_path):
    with pytest.raises(ClusterError, match=r"exited with code .*\n(.|\n)*--no-such-flag"):
        with SingleServer(tiny_model, ["--no-such-flag"], log_dir=str(tmp_path)):
            pass
    assert descendants() == []


def test_free_port_never_hands_out_a_port_twice_nor_a_busy_or_ephemeral_one(monkeypatch):
    """Two races of picking ports before servers bind them: the kernel gave two binds in a row the
    same free port (a router and a prefill of one cluster), and an outgoing connection took a
    picked ephemeral port before the prefill bound it. free_port skips ports it handed out and
    busy ones, and picks below the ephemeral range."""
    import socket

    from sglang_memha.testing import procs

    low, high = procs._PICK_RANGE
    eph_low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    assert low >= 20000 and high <= max(eph_low, 30000)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy_port = busy.getsockname()[1]
    with socket.socket() as probe:  # a free port inside the range for the "handed out" case
        for cand in range(low + 1, high):
            try:
                probe.bind(("127.0.0.1", cand))
                break
            except OSError:
                continue
    proposals = iter([cand, cand, busy_port, cand, cand + 0, low])

    class _Rng:
        def randrange(self, a, b):
            assert (a, b) == (low, high)
            return next(proposals)

    monkeypatch.setattr(procs, "_HANDED_OUT", set())
    monkeypatch.setattr(procs, "_rng", _Rng())
    try:
        assert procs.free_port() == cand
        assert procs.free_port() == low  # cand handed out, busy_port in use: both skipped
    finally:
        busy.close()
    monkeypatch.setattr(procs, "_rng", __import__("random").Random(0))
    ports = [procs.free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(low <= p < high for p in ports)
