"""Faults on a real PD deployment with quantized, pipelined KV (issue 9): a decode killed, the
prefill killed, the link cut, client aborts before/during/after the transfer, a transfer past
its timeout. Each must end the affected request with an error whose cause is named where it
can be: in the client's answer and, always, in the log of a server that saw it (read from that
scenario's part of the log, naming the request's room or rid: ``fault_causes``); never a hang.
Later requests through the surviving servers must complete, and every surviving server's KV
pool must come back to 0 used tokens, read from the server (``cluster.wait_idle``).

A client abort is correct only when a decode logged the abort of that request and every page
came back; it is never counted lost. A dead decode's client sees only a closed connection
("Remote end closed ..."), which names nothing: the prefill's log must name the failed room.

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


def _check(rec: faults.FaultRecord, client: str, server: str | tuple[str, ...], line: str) -> None:
    """The victim's cause is named (``client`` at its client, "" = none can reach it; ``line``
    in ``server``'s log), nothing is lost, survivors complete and no page is kept anywhere."""
    assert rec.client_cause == client, rec
    assert rec.log_server in ((server,) if isinstance(server, str) else server), rec
    assert line in rec.log_cause, rec
    assert rec.victim_clear, rec
    assert rec.lost == 0, rec
    assert rec.survivors_ok, rec
    assert rec.used_after and not any(rec.used_after), rec


def test_transfer_past_its_timeout(tiny_model, link, tmp_path):
    with faults.cluster(tiny_model, link, str(tmp_path), decode_env=faults.TIMEOUT_DECODE_ENV) as c:
        rec = faults.transfer_timeout(c)
        _check(rec, faults.TIMEOUT_TEXT, "decode", faults.TIMEOUT_TEXT)
        assert rec.victim_status == 500, rec
    assert descendants() == []


def test_aborts_decode_kill_and_link_cut(tiny_model, link, tmp_path):
    with faults.cluster(tiny_model, link, str(tmp_path), decodes=2) as c:
        for phase in ("before", "during", "after"):
            rec = faults.client_abort(c, link, phase)
            assert rec.aborted_by_client, rec
            _check(rec, "", ("decode", "decode1"),
                   "Abort running request" if phase == "after" else "Aborted by AbortReq")
        rec = faults.decode_killed_mid_transfer(c, link)
        _check(rec, "", "prefill", "Failed to send kv chunk")
        assert not rec.aborted_by_client and rec.victim_status != 200, rec
        rec = faults.link_cut_mid_transfer(c, link)
        _check(rec, "Lost connection with prefill", "decode1", "Lost connection with prefill instance")
    assert descendants() == []


def test_prefill_killed_mid_forward(tiny_model, link, tmp_path):
    with faults.cluster(tiny_model, link, str(tmp_path)) as c:
        rec = faults.prefill_killed_mid_forward(c)
        _check(rec, "Lost connection with prefill", "decode", "Lost connection with prefill instance")
    assert descendants() == []

