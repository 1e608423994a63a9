"""``MemhaKVManager`` as SGLang sees it (``sglang_ext/transfer/mooncake_conn.py``): one class
built from one mixin per concern, and the per-room byte accounting (``conn_bytes``) writing the
transfer line that ``testing.transfer_log`` parses. In-process, no servers, no Mooncake engine."""
from __future__ import annotations

import logging

import pytest

mc = pytest.importorskip("sglang.srt.disaggregation.mooncake.conn")

from sglang_memha.sglang_ext.transfer import conn_bridges, conn_bytes, conn_handshake  # noqa: E402
from sglang_memha.sglang_ext.transfer.mooncake_conn import MemhaKVManager  # noqa: E402
from sglang_memha.testing.transfer_log import transfer_rows  # noqa: E402


def test_one_manager_class_over_sglangs():
    assert issubclass(MemhaKVManager, mc.MooncakeKVManager)
    assert MemhaKVManager.memha_sglang_cls is mc.MooncakeKVManager  # the hooks are not applied here
    owners = {name: next(c for c in MemhaKVManager.__mro__ if name in c.__dict__)
              for name in ("_validate_peer_state_layout", "try_ensure_parallel_info", "_send_converted",
                           "_accept_repaged", "_transfer_data", "transfer_worker", "send_kvcache")}
    assert owners["_validate_peer_state_layout"] is conn_handshake.HandshakeMixin
    assert owners["try_ensure_parallel_info"] is conn_handshake.HandshakeMixin
    assert owners["_send_converted"] is owners["_accept_repaged"] is conn_bridges.BridgeMixin
    assert owners["_transfer_data"] is owners["transfer_worker"] is conn_bytes.ByteAccountingMixin
    assert owners["send_kvcache"] is MemhaKVManager
    # the mixins never shadow each other: each method is defined once above SGLang's class
    ours = [c for c in MemhaKVManager.__mro__[:MemhaKVManager.__mro__.index(mc.MooncakeKVManager)]]
    names = [n for c in ours for n, v in vars(c).items() if callable(v) and not n.startswith("__")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_room_bytes_split_kv_vs_other_and_logged_in_the_parsed_format(monkeypatch, caplog):
    results = iter([0, 0, -1])
    monkeypatch.setattr(mc.MooncakeKVManager, "_transfer_data", lambda self, session, blocks: next(results))
    mgr = object.__new__(MemhaKVManager)
    mgr._init_room_stats()
    mgr.memha_desc, mgr.memha_stock, mgr.request_status = None, False, {}
    mgr._memha_tls.room = 42
    mgr._room_stats().pages += 3
    mgr._memha_tls.phase = "kv"
    assert mgr._transfer_data("s", [(0, 0, 100), (0, 0, 28)]) == 0
    mgr._memha_tls.phase = None
    assert mgr._transfer_data("s", [(0, 0, 5)]) == 0  # aux metadata
    assert mgr._transfer_data("s", [(0, 0, 7)]) == -1  # a failed call moves nothing
    with caplog.at_level(logging.WARNING, logger="sglang_memha"):
        mgr._log_room(42, "ok")
        mgr._log_room(42, "ok")  # once per room
    rows = transfer_rows(caplog.text)
    assert len(rows) == 1
    row = rows[0]
    assert (row.room, row.fmt, row.pages, row.pipelined_pages, row.kv_bytes, row.total_bytes, row.status) == (
        42, "stock", 3, 0, 128, 133, "ok")


def test_rooms_cleared_without_a_conclude_are_logged_aborted(caplog):
    mgr = object.__new__(MemhaKVManager)
    mgr._init_room_stats()
    mgr.memha_desc, mgr.memha_stock, mgr.request_status = None, False, {7: object()}
    for room in (7, 8):
        mgr._memha_tls.room = room
        mgr._room_stats()
    with caplog.at_level(logging.WARNING, logger="sglang_memha"):
        mgr._sweep_rooms()
    assert [(r.room, r.status) for r in transfer_rows(caplog.text)] == [(8, "aborted")]
