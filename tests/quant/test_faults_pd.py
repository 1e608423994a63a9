"""Faults on a real PD deployment with quantized, pipelined KV (issue 9): a decode killed, the
prefill killed, the link cut, client aborts before/during/after the transfer, a transfer past
its timeout. Each must end the affected request with an explicit error naming the cause
(never a hang), let later requests through the surviving servers complete, and leave every
surviving server's KV pool at 0 used tokens, read from the server (``cluster.wait_idle``).

Scenarios live in ``sglang_memha.testing.faults`` (shared with ``eval/faults_pd.py``); the
servers sit in a shaped-link namespace pair at 500 kbit/s so a 2000-token prompt's KV takes ~8 s
to cross and "mid-transfer" is a real window. Needs root (network namespaces); ~5 min.
"""
from __future__ import annotations

import pytest

from sglang_memha.testing import faults
from sglang_memha.testing.netns import ShapedLink, netns_available
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

_ok, _why = netns_available()


@pytest.fixture(scope="module")
def link():
    if not _ok:
        pytest.skip(f"shaped link unavailable: {_why}")
    with ShapedLink(rate=faults.LINK_RATE, prefix="mhft") as lk:
        yield lk


def _check(rec: faults.FaultRecord) -> None:
    assert rec.victim_clear, rec
    assert rec.survivors_ok, rec
    assert rec.used_after and not any(rec.used_after), rec  # no page kept anywhere


def test_transfer_past_its_timeout(tiny_model, link, tmp_path):
    with faults.cluster(tiny_model, link, str(tmp_path), decode_env=faults.TIMEOUT_DECODE_ENV) as c:
        rec = faults.transfer_timeout(c)
        _check(rec)
        assert "timed out after 5.0s" in rec.victim_reason
    assert descendants() == []


def test_aborts_decode_kill_and_link_cut(tiny_model, link, tmp_path):
    with faults.cluster(tiny_model, link, str(tmp_path), decodes=2) as c:
        for phase in ("before", "during", "after"):
            _check(faults.client_abort(c, link, phase))
        logs = c.logs()
        assert "Abort" in logs["decode"] + logs["decode1"]  # the router passed the aborts on
        rec = faults.decode_killed_mid_transfer(c, link)
        _check(rec)
        rec = faults.link_cut_mid_transfer(c, link)
        _check(rec)
        assert "Lost connection with prefill" in rec.victim_reason
    assert descendants() == []


def test_prefill_killed_mid_forward(tiny_model, link, tmp_path):
    with faults.cluster(tiny_model, link, str(tmp_path)) as c:
        rec = faults.prefill_killed_mid_forward(c)
        _check(rec)
        assert "Lost connection with prefill" in rec.victim_reason
    assert descendants() == []
