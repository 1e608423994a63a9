"""``testing.fault_causes`` and ``FaultRecord.lost`` on log text, without servers: only lines
logged after the window opened count, a line must name the victim's id, and a closed
connection at the client names nothing. The lines are real ones from the fault scenarios'
server logs (``tests/quant/test_faults_pd.py``), their ids shortened."""
from __future__ import annotations

from types import SimpleNamespace

from sglang_memha.testing.fault_causes import Expect, LogWindow
from sglang_memha.testing.faults import FaultRecord

PREFILL_FAILED = ("[2026-12-07 14:51:01] Prefill transfer failed for request rank=0 req.rid='aaf2' "
                  "req.bootstrap_room=11 with exception KVTransferError(bootstrap_room=11): "
                  "Failed to send kv chunk of 11 to 10.200.0.2:41793\n")
ABORTED = ("[2026-12-07 14:50:28] Decode transfer failed for request rank=0 decode_req.req.rid='92c8' "
           "decode_req.req.bootstrap_room=98 with exception KVTransferError(bootstrap_room=98): "
           "Aborted by AbortReq.\n")
DEAD_DECODE = Expect(client=(), logs=("prefill",), line=("Failed to send kv chunk",))


def _cluster(tmp_path, **texts):
    procs = []
    for name, text in texts.items():
        (tmp_path / f"{name}.log").write_text(text)
        procs.append(SimpleNamespace(name=name, log_path=str(tmp_path / f"{name}.log")))
    return SimpleNamespace(procs=procs)


def test_only_lines_after_the_window_count(tmp_path):
    c = _cluster(tmp_path, prefill=PREFILL_FAILED, decode="")
    win = LogWindow(c)
    assert win.find(DEAD_DECODE, "bootstrap_room=11")[:2] == ("", "")  # logged before the fault
    with open(tmp_path / "prefill.log", "a") as f:
        f.write(PREFILL_FAILED)
    server, line, note = win.find(DEAD_DECODE, "bootstrap_room=11")
    assert (server, note) == ("prefill", "")
    assert line.startswith("Prefill transfer failed") and "Failed to send kv chunk of 11" in line


def test_the_line_must_name_the_victim(tmp_path):
    c = _cluster(tmp_path, decode="", decode1="")
    win = LogWindow(c)
    (tmp_path / "decode1.log").write_text(ABORTED)
    expect = Expect(client=(), logs=("decode", "decode1"), line=("Aborted by AbortReq",))
    assert win.find(expect, "rid='92c8'")[0] == "decode1"
    server, line, note = win.find(expect, "rid='other'")
    assert (server, line) == ("", "")
    assert "no line names rid='other'" in note and "decode1: Decode transfer failed" in note


def test_client_text_needs_an_error_answer():
    expect = Expect(client=("timed out after 5.0s",), logs=("decode",), line=("timed out",))
    reason = "KVTransferError(bootstrap_room=5): Request 5 timed out after 5.0s in KVPoll.WaitingForInput"
    assert expect.client_cause(500, reason) == "timed out after 5.0s"
    assert expect.client_cause(200, reason) == ""
    assert "decode log" in expect.describe("bootstrap_room=5")


def test_remote_end_closed_alone_is_lost():
    """A dead decode's client reads a closed connection: no cause until a server's line names it.
    A request its client aborted is never lost; one that completed is not lost."""
    rec = FaultRecord("decode killed mid-transfer", victim_status=0,
                      victim_reason="Remote end closed connection without response")
    assert rec.lost == 1 and not rec.victim_clear
    assert DEAD_DECODE.client_cause(rec.victim_status, rec.victim_reason) == ""
    rec.log_cause = PREFILL_FAILED
    assert rec.lost == 0
    assert FaultRecord("client abort after transfer", aborted_by_client=True).lost == 0
    assert FaultRecord("x", victim_status=200, completed=True).lost == 0
