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


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel gave two binds in a row the same free port (a router and a prefill of one
    cluster got one port in CI); free_port skips ports it handed out before."""
    from sglang_memha.testing import procs

    ports = iter([41001, 41001, 41001, 41002])

    class _Sock:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def bind(self, addr):
            self.port = next(ports)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(procs, "_HANDED_OUT", set())
    monkeypatch.setattr(procs.socket, "socket", lambda *a, **k: _Sock())
    assert procs.free_port() == 41001
    assert procs.free_port() == 41002
