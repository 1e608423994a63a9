"""Fault injection on a real PD deployment: each scenario breaks one thing while a request's KV
is on the wire and reports what happened, read from the servers (never assumed).

Used by ``tests/quant/test_faults_pd.py`` (asserts) and ``eval/faults_pd.py`` (the issue-9
table and JSON). Every scenario runs on a ``PDCluster`` whose servers sit in a ``ShapedLink``
slow enough that a long prompt's KV takes seconds to cross (``LONG_TOKENS`` fp8 rows of the tiny
model: ~0.53 MB, ~8 s at 500 kbit/s), so "mid-transfer" is a real window: the fault is injected
once the prefill -> decode tbf counter shows ``IN_FLIGHT_BYTES`` of it sent.

Each scenario states what names its cause (``fault_causes.Expect``): the text the victim's
client must get, where a client can get one, and the line a named server's log must gain after
the fault (read from that scenario's part of the log only), naming the victim's room or rid:

=============================  ==============================  ==================================
scenario                       client text                     log line (whose log)
=============================  ==============================  ==================================
transfer exceeds its timeout   ``s in KVPoll.WaitingForInput`` ``s in KVPoll.WaitingForInput``
                               (SGLang's "timed out after      (decode)
                               <elapsed>s in ...")
client abort before / during   none: the client left           ``Aborted by AbortReq`` (a decode)
client abort after             none: the client left           ``Abort running request`` (a
                                                               decode; its log level is raised
                                                               to debug for this scenario)
decode killed mid-transfer     none: a closed connection       ``Failed to send kv chunk``
                               (the router's or the dead       (prefill), and the prefill's
                               decode's) names nothing         transfer line ``status=failed``
link cut mid-transfer          ``Lost connection with          ``Lost connection with prefill
                               prefill``                       instance`` (decode1)
prefill killed mid-forward     ``Lost connection with          ``Lost connection with prefill
                               prefill``                       instance`` (decode)
=============================  ==============================  ==================================

A ``FaultRecord`` per scenario:

* ``victim_status`` / ``victim_reason``: what the client of the broken request got (HTTP status,
  0 = connection closed, -1 = nothing read; the error text); ``client_cause`` / ``log_cause``
  (``log_server``): the expected text found in it / the log line found, "" when missing
  (``log_note`` then says what was there); ``expected``: what was looked for;
* ``victim_clear``: the victim ended within the deadline and its cause is named where expected
  (client text and log line); for a client abort: the servers logged the abort of that request
  and every page came back;
* ``lost`` (1/0): the victim was not aborted by its client (``aborted_by_client``) and neither
  completed nor failed with a named cause (client text or log line);
* ``survivors_ok``: requests sent afterwards through the surviving servers completed;
* ``used_after``: KV tokens still held by each surviving server once it settled
  (``cluster.wait_idle``), i.e. leaked pages x page size when not 0.
"""
from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import random
import signal
import socket
import time
import uuid
from dataclasses import dataclass, field

from sglang_memha.testing.cluster import PDCluster, wait_idle
from sglang_memha.testing.fault_causes import Expect, LogWindow
from sglang_memha.testing.procs import http_json
from sglang_memha.testing.transfer_log import transfer_rows

PAGE_SIZE = 16
LONG_TOKENS = 2000
SHORT_TOKENS = 300
LINK_RATE = "500kbit"
IN_FLIGHT_BYTES = 100_000
VICTIM_DEADLINE_S = 120.0


@dataclass
class FaultRecord:
    fault: str
    victim_status: int = -1
    victim_reason: str = ""
    client_cause: str = ""
    log_cause: str = ""
    log_server: str = ""
    log_note: str = ""
    expected: str = ""
    aborted_by_client: bool = False
    completed: bool = False
    victim_clear: bool = False
    survivors_ok: bool = False
    used_after: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def lost(self) -> int:
        named = bool(self.client_cause or self.log_cause)
        return 0 if self.aborted_by_client or self.completed or named else 1

    @property
    def pages_leaked(self) -> int:
        return sum(-(-u // PAGE_SIZE) for u in self.used_after)


def request(tokens: int, new_tokens: int = 8, **extra) -> dict:
    """A /generate payload of ``tokens`` fresh random ids (no radix-cache hit)."""
    return {"input_ids": [random.randrange(100, 1000) for _ in range(tokens)],
            "sampling_params": {"max_new_tokens": new_tokens, "temperature": 0, "ignore_eos": True},
            **extra}


def _ok(resp) -> bool:
    status, body = resp
    return status == 200 and isinstance(body, dict) and "output_ids" in body


def _wait_in_flight(link, sent_before: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while link.sent_bytes()[0] - sent_before < IN_FLIGHT_BYTES:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no KV crossed the shaped link within {timeout_s:.0f} s")
        time.sleep(0.05)


def _victim(c: PDCluster, decode_index: int, room: int):
    ex = concurrent.futures.ThreadPoolExecutor(1)
    fut = ex.submit(c.direct_generate, request(LONG_TOKENS), decode_index, VICTIM_DEADLINE_S, room)
    ex.shutdown(wait=False)
    return fut


def _answer(rec: FaultRecord, fut, expect: Expect) -> bool:
    """Fill the client fields from the victim's answer; False when it hung past the deadline."""
    try:
        status, body = fut.result(timeout=VICTIM_DEADLINE_S + 30)
    except concurrent.futures.TimeoutError:
        rec.victim_reason = f"no answer within {VICTIM_DEADLINE_S + 30:.0f} s"
        return False
    rec.victim_status, rec.victim_reason = status, str(body)[:500]
    rec.completed = _ok((status, body))
    rec.client_cause = expect.client_cause(status, rec.victim_reason)
    return True


def _log_cause(rec: FaultRecord, win: LogWindow, expect: Expect, key: str) -> None:
    rec.expected = expect.describe(key)
    rec.log_server, rec.log_cause, rec.log_note = win.find(expect, key)


def _named(rec: FaultRecord, answered: bool, expect: Expect) -> bool:
    """The victim failed in time, with the client text (where one can reach it) and the log line."""
    return (answered and rec.victim_status != 200 and bool(rec.log_cause)
            and (bool(rec.client_cause) or not expect.client))


def _proc(c: PDCluster, name: str):
    return next(p for p in c.procs if p.name == name)


def _kill(c: PDCluster, name: str) -> None:
    os.killpg(_proc(c, name).pid, signal.SIGKILL)
    _proc(c, name).popen.wait(timeout=30)


def _room_row(c: PDCluster, room: int):
    rows = [r for r in transfer_rows(c.logs()["prefill"]) if r.room == room]
    return rows[-1] if rows else None


def _decode_name(i: int) -> str:
    return "decode" if i == 0 else f"decode{i}"


def decode_killed_mid_transfer(c: PDCluster, link) -> FaultRecord:
    """Decode 0 is SIGKILLed while the victim's layers cross the link. Its client can only see
    a closed connection, so the cause must be named by the surviving prefill: SGLang's
    ``Prefill transfer failed ... Failed to send kv chunk of <room> to <the dead decode>`` and
    our transfer line for the room with ``status=failed`` (or ``aborted``). Survivors: the
    prefill and decode 1 (a request through them completes)."""
    rec, t0 = FaultRecord("decode killed mid-transfer"), time.monotonic()
    expect = Expect(client=(), logs=("prefill",), line=("Failed to send kv chunk",))
    room, win = random.getrandbits(63), LogWindow(c)
    before = link.sent_bytes()[0]
    fut = _victim(c, 0, room)
    _wait_in_flight(link, before)
    _kill(c, "decode")
    answered = _answer(rec, fut, expect)
    rec.survivors_ok = _ok(c.direct_generate(request(SHORT_TOKENS), 1))
    rec.used_after = wait_idle([c.prefill_url, c.decode_urls[1]])
    _log_cause(rec, win, expect, f"bootstrap_room={room}")
    row = _room_row(c, room)  # the prefill's own verdict on the room
    if row is None or row.status not in ("failed", "aborted"):
        rec.log_note += f"; transfer line of room {room}: {row.status if row else 'none'}"
        rec.log_cause = ""
    rec.victim_clear = _named(rec, answered, expect)
    rec.seconds = time.monotonic() - t0
    return rec


def link_cut_mid_transfer(c: PDCluster, link, decode_index: int = 1) -> FaultRecord:
    """The prefill <-> decode veth goes down mid-transfer and comes back once the victim failed:
    the decode notices the silent prefill (SGLang's heartbeat) and fails the request
    (``Lost connection with prefill instance`` at the client and in that decode's log); after
    the link is back, new requests to the same decode complete."""
    rec, t0 = FaultRecord("link cut mid-transfer"), time.monotonic()
    expect = Expect(client=("Lost connection with prefill",), logs=(_decode_name(decode_index),),
                    line=("Lost connection with prefill instance",))
    room, win = random.getrandbits(63), LogWindow(c)
    before = link.sent_bytes()[0]
    fut = _victim(c, decode_index, room)
    _wait_in_flight(link, before)
    link.cut()
    try:
        answered = _answer(rec, fut, expect)
    finally:
        link.restore()
    rec.survivors_ok = _ok(c.direct_generate(request(SHORT_TOKENS), decode_index, 180))
    rec.used_after = wait_idle([c.prefill_url, c.decode_urls[decode_index]])
    _log_cause(rec, win, expect, f"bootstrap_room={room}")
    rec.victim_clear = _named(rec, answered, expect)
    rec.seconds = time.monotonic() - t0
    return rec


def prefill_killed_mid_forward(c: PDCluster) -> FaultRecord:
    """The prefill is SIGKILLed right after the victim reached it (its forward or first layers
    running). Survivor: the decode, which fails the request once its heartbeat finds the prefill
    gone (``Lost connection with prefill instance`` at the client and in its log), returns to
    idle and stays healthy."""
    rec, t0 = FaultRecord("prefill killed mid-forward"), time.monotonic()
    expect = Expect(client=("Lost connection with prefill",), logs=("decode",),
                    line=("Lost connection with prefill instance",))
    room, win = random.getrandbits(63), LogWindow(c)
    fut = _victim(c, 0, room)
    time.sleep(0.3)
    _kill(c, "prefill")
    answered = _answer(rec, fut, expect)
    rec.survivors_ok = http_json(f"{c.decode_url}/health", timeout=10)[0] == 200
    rec.used_after = wait_idle([c.decode_url])
    _log_cause(rec, win, expect, f"bootstrap_room={room}")
    rec.victim_clear = _named(rec, answered, expect)
    rec.seconds = time.monotonic() - t0
    return rec


def transfer_timeout(c: PDCluster, decode_index: int = 0) -> FaultRecord:
    """The victim's transfer outlasts the decode's ``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``
    (``TIMEOUT_DECODE_ENV`` on that decode): the decode fails it with SGLang's timeout (at the
    client and in its log) and holds its pages until the prefill acks that its layers stopped;
    then a short request to the same decode completes."""
    rec, t0 = FaultRecord("transfer exceeds its timeout"), time.monotonic()
    expect = Expect(client=(TIMEOUT_TEXT,), logs=(_decode_name(decode_index),), line=(TIMEOUT_TEXT,))
    room, win = random.getrandbits(63), LogWindow(c)
    answered = _answer(rec, _victim(c, decode_index, room), expect)
    rec.used_after = wait_idle([c.prefill_url, c.decode_urls[decode_index]])
    rec.survivors_ok = _ok(c.direct_generate(request(SHORT_TOKENS), decode_index))
    _log_cause(rec, win, expect, f"bootstrap_room={room}")
    rec.victim_clear = _named(rec, answered, expect)
    rec.seconds = time.monotonic() - t0
    return rec


# ---- deployments -------------------------------------------------------------------------------
# fp8 pools, the prefill pipelining every prompt; a decode's pages of a failed request come back
# after the prefill's drain ack or, with a dead prefill, after this release timeout (default 30 s).
ENV = {"MEMHA_KV_FORMAT": "fp8_e4m3", "SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_RELEASE_TIMEOUT": "15"}
PREFILL_ENV = {"MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": "0"}
TIMEOUT_DECODE_ENV = {"SGLANG_DISAGGREGATION_WAITING_TIMEOUT": "5"}  # s; the victim needs ~8
# SGLang's text is "Request R timed out after <elapsed>s in KVPoll.WaitingForInput", the elapsed
# time as measured (5.0 s, and 5.1 s on a loaded box), so the stable tail is what is matched.
TIMEOUT_TEXT = "s in KVPoll.WaitingForInput"


def cluster(model: str, link, log_dir: str, decodes: int = 1, decode_env: dict | None = None) -> PDCluster:
    page = ["--page-size", str(PAGE_SIZE)]
    return PDCluster(model, page, page, env=ENV, prefill_env=PREFILL_ENV, decode_env=decode_env,
                     extra_decode_envs=[{}] * (decodes - 1), link=link, log_dir=log_dir)


def run_all(model: str, link, log_dir: str, progress=print) -> list[FaultRecord]:
    """Every scenario, three deployments in turn (~6 min on 2 cores)."""
    recs = []
    with cluster(model, link, f"{log_dir}/timeout", decode_env=TIMEOUT_DECODE_ENV) as c:
        recs.append(transfer_timeout(c))
        progress(recs[-1])
    with cluster(model, link, f"{log_dir}/two_decodes", decodes=2) as c:
        for phase in ("before", "during", "after"):
            recs.append(client_abort(c, link, phase))
            progress(recs[-1])
        recs.append(decode_killed_mid_transfer(c, link))
        progress(recs[-1])
        recs.append(link_cut_mid_transfer(c, link))
        progress(recs[-1])
    with cluster(model, link, f"{log_dir}/prefill") as c:
        recs.append(prefill_killed_mid_forward(c))
        progress(recs[-1])
    return recs


def _open_stream(url: str, body: dict) -> http.client.HTTPConnection:
    """Client side of an abort: a streaming /generate sent to the router, connection kept open."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=VICTIM_DEADLINE_S)
    conn.request("POST", "/generate", json.dumps(body), {"Content-Type": "application/json"})
    return conn


def _drop(conn: http.client.HTTPConnection) -> None:
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()


def _log_level(urls: list[str], level: str) -> None:
    """SGLang's ``/configure_logging``: the root log level of each server's processes."""
    for url in urls:
        status, body = http_json(f"{url}/configure_logging", {"log_level": level}, timeout=30)
        if status != 200:
            raise RuntimeError(f"{url}/configure_logging log_level={level} answered {status}: {str(body)[:200]}")


def client_abort(c: PDCluster, link, phase: str) -> FaultRecord:
    """The client closes its connection to the router ``before`` the KV moves (0.2 s after
    sending), ``during`` the transfer, or ``after`` it (once the first streamed token arrived).
    SGLang aborts the request; the decode that held it must log that abort for the request's
    ``rid`` (sent by the client): ``Decode transfer failed ... Aborted by AbortReq.`` before or
    during the transfer; after it only SGLang's debug line ``Abort running request.``, so the
    decodes run at debug level for that phase. The client left on purpose (``aborted_by_client``:
    never counted lost); ``victim_clear`` = the abort is in a decode's log and every page came
    back; then the next request must complete. ``victim_reason`` is what the client had read."""
    rec, t0 = FaultRecord(f"client abort {phase} transfer"), time.monotonic()
    rec.aborted_by_client = True
    line = ("Abort running request",) if phase == "after" else ("Aborted by AbortReq",)
    expect = Expect(client=(), logs=tuple(_decode_name(i) for i in range(len(c.decode_urls))), line=line)
    rid = uuid.uuid4().hex
    body = request(LONG_TOKENS if phase != "after" else SHORT_TOKENS, 400, stream=True, rid=rid)
    if phase == "after":
        _log_level(c.decode_urls, "debug")
    win, before = LogWindow(c), link.sent_bytes()[0]
    conn = _open_stream(c.url, body)
    if phase == "before":
        time.sleep(0.2)
    elif phase == "during":
        _wait_in_flight(link, before)
    else:
        resp = conn.getresponse()
        rec.victim_status, rec.victim_reason = resp.status, resp.read(120).decode(errors="replace")
    _drop(conn)
    rec.used_after = wait_idle([c.prefill_url, *c.decode_urls])
    if phase == "after":
        _log_level(c.decode_urls, "info")
    _log_cause(rec, win, expect, f"rid='{rid}'")
    rec.victim_clear = bool(rec.log_cause) and bool(rec.used_after) and not any(rec.used_after)
    status, _ = c.generate(input_ids=request(SHORT_TOKENS)["input_ids"], max_new_tokens=8)
    rec.survivors_ok = status == 200
    rec.seconds = time.monotonic() - t0
    return rec
