"""``XPyDCluster``'s argument checks and ``http_call``, without starting a server (the cluster
itself runs in ``tests/quant/test_xpyd_pd.py``)."""
from __future__ import annotations

import pytest

from sglang_memha.testing.procs import free_port
from sglang_memha.testing.xpyd import XPyDCluster, http_call


def test_needs_a_prefill_and_a_decode(tmp_path):
    with pytest.raises(ValueError, match=r"^XPyDCluster needs at least one prefill and one decode, "
                                         r"got 0 prefill_envs and 1 decode_envs$"):
        XPyDCluster("m", [], [{}], log_dir=str(tmp_path))


def test_more_flag_lists_than_servers_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^decode_args has 3 entries for 2 decode servers \(decode_envs\): "
                                         r"give one flag list per server, or fewer$"):
        XPyDCluster("m", [{}], [{}, {}], decode_args=[[], [], []], log_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"^prefill_args has 2 entries for 1 prefill servers"):
        XPyDCluster("m", [{}], [{}], prefill_args=[[], []], log_dir=str(tmp_path))


def test_missing_flag_lists_are_empty(tmp_path):
    c = XPyDCluster("m", [{}, {}], [{}, {}, {}], decode_args=[["--page-size", "32"]], log_dir=str(tmp_path))
    assert (c.prefill_args, c.decode_args) == ([[], []], [["--page-size", "32"], [], []])
    assert len({*c.prefill_urls, *c.decode_urls}) == 5 and len(set(c.bootstrap_ports)) == 2


def test_unknown_ready_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^ready='now': expected 'generate' or 'health'$"):
        XPyDCluster("m", [{}], [{}], ready="now", log_dir=str(tmp_path))


def test_http_call_reports_an_unreachable_server_as_status_0():
    status, body = http_call("DELETE", f"http://127.0.0.1:{free_port()}/workers/x", timeout=5)
    assert status == 0 and "refused" in body.lower(), body
