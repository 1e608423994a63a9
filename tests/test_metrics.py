"""``sglang_ext/metrics``: what each accounting point records, with exact values, and that nothing is
created or imported without ``--enable-metrics``. In-process, no servers: every test gets its own
prometheus registry (``registry`` fixture), the way SGLang's scheduler would hold the default one.
The figures on a real server's ``/metrics``: ``tests/quant/test_metrics_pd.py``."""
from __future__ import annotations

import logging
import pickle
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

prometheus_client = pytest.importorskip("prometheus_client")
mc = pytest.importorskip("sglang.srt.disaggregation.mooncake.conn")

from sglang_memha.kvformat import FormatDescriptor  # noqa: E402
from sglang_memha.sglang_ext import metrics  # noqa: E402
from sglang_memha.sglang_ext.transfer import arrival, handshake, integrity  # noqa: E402
from sglang_memha.sglang_ext.transfer.mooncake_conn import MemhaKVManager, MemhaKVReceiver  # noqa: E402
from sglang_memha.testing.transfer_log import transfer_rows  # noqa: E402

LABELS = {"model_name": "tiny", "engine_type": "prefill", "tp_rank": 0, "pp_rank": 0, "moe_ep_rank": 0}
BASE = {k: str(v) for k, v in LABELS.items()}


def desc(**kw):
    base = dict(fmt="fp8_e4m3", page_size=16, num_kv_heads=2, head_dim=64, num_layers=2, model_id="m#1")
    return FormatDescriptor(**{**base, **kw})


@pytest.fixture
def registry():
    metrics.stop()
    reg = prometheus_client.CollectorRegistry()
    yield reg
    metrics.stop()


def value(reg, name: str, **extra) -> float | None:
    return reg.get_sample_value(name, {**BASE, **extra})


def test_off_by_default_records_nothing_and_never_imports_prometheus():
    """A fresh process: every recording function is a no-op, prometheus_client stays unimported
    (it may only be imported after SGLang's launcher set PROMETHEUS_MULTIPROC_DIR)."""
    code = ("import sys\n"
            "from sglang_memha.sglang_ext import metrics\n"
            "metrics.room_concluded('fp8_e4m3', 3, 1, 100, 0.1, True)\n"
            "metrics.kv_received('fp8_e4m3', 100); metrics.handshake_refused('auth')\n"
            "metrics.checksum_failed(); metrics.pages_converted('bf16', 'fp8_e4m3', 2)\n"
            "assert not metrics.enabled() and metrics.active() is None\n"
            "assert 'prometheus_client' not in sys.modules, 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_scheduler_without_enable_metrics_creates_nothing(registry, monkeypatch):
    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)
    sched = SimpleNamespace(server_args=SimpleNamespace(enable_metrics=False))
    assert metrics.start_in_scheduler("r", sched) == "r"
    assert not metrics.enabled()
    metrics.room_concluded("fp8_e4m3", 3, 1, 100, 0.1, True)
    assert list(registry.collect()) == []


def test_scheduler_with_enable_metrics_uses_sglangs_labels_and_sets_the_pool_gauge(registry, monkeypatch):
    from sglang_memha.sglang_ext import state

    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)  # what SGLang's scheduler registers into
    monkeypatch.setattr(state, "_local", desc(fmt="int4_g64"))
    monkeypatch.setattr(state, "_stock", False)
    sched = SimpleNamespace(server_args=SimpleNamespace(enable_metrics=True), max_total_num_tokens=12345,
                            metrics_collector=SimpleNamespace(labels={**LABELS, "dp_rank": 1}))
    metrics.start_in_scheduler(None, sched)
    assert metrics.enabled()
    assert value(registry, "sglang:memha_kv_pool_capacity_tokens", dp_rank="1", format="int4_g64") == 12345
    metrics.start_in_scheduler(None, sched)  # once per process: no duplicate registration


def test_pool_gauge_of_sglangs_own_pool_is_stock(registry, monkeypatch):
    from sglang_memha.sglang_ext import state

    monkeypatch.setattr(prometheus_client, "REGISTRY", registry)
    monkeypatch.setattr(state, "_local", desc(fmt="bf16"))
    monkeypatch.setattr(state, "_stock", True)  # SGLang's bf16 pool, described for memha decodes
    sched = SimpleNamespace(server_args=SimpleNamespace(enable_metrics=True), max_total_num_tokens=64,
                            metrics_collector=SimpleNamespace(labels=LABELS))
    metrics.start_in_scheduler(None, sched)
    assert value(registry, "sglang:memha_kv_pool_capacity_tokens", format="stock") == 64


def test_each_recorder_adds_exactly_its_figures(registry):
    metrics.start(LABELS, "fp8_e4m3", 4096, registry)
    metrics.room_concluded("fp8_e4m3", 38, 30, 38 * 8704, 0.004, True)
    metrics.room_concluded("fp8_e4m3", 1, 0, 8704, 0.2, True)
    metrics.room_concluded("fp8_e4m3", 2, 0, 100, 7.0, False)  # failed: bytes and pages, no timing
    metrics.room_concluded("stock", 1, 0, 16384, 0.03, True)
    assert value(registry, "sglang:memha_kv_sent_bytes_total", format="fp8_e4m3") == 39 * 8704 + 100
    assert value(registry, "sglang:memha_kv_sent_bytes_total", format="stock") == 16384
    assert value(registry, "sglang:memha_kv_sent_pages_total", format="fp8_e4m3") == 41
    assert value(registry, "sglang:memha_kv_pipelined_pages_total", format="fp8_e4m3") == 30
    assert value(registry, "sglang:memha_kv_transfer_seconds_count", format="fp8_e4m3") == 2
    assert value(registry, "sglang:memha_kv_transfer_seconds_sum", format="fp8_e4m3") == pytest.approx(0.204)
    assert value(registry, "sglang:memha_kv_transfer_seconds_bucket", format="fp8_e4m3", le="0.005") == 1
    assert value(registry, "sglang:memha_kv_transfer_seconds_bucket", format="fp8_e4m3", le="0.25") == 2
    metrics.kv_received("fp8_e4m3fnuz", 8704)
    metrics.kv_received("fp8_e4m3fnuz", 8704)
    assert value(registry, "sglang:memha_kv_received_bytes_total", format="fp8_e4m3fnuz") == 2 * 8704
    for kind in ("auth", "auth", "malformed"):
        metrics.handshake_refused(kind)
    assert value(registry, "sglang:memha_handshake_refusals_total", reason="auth") == 2
    assert value(registry, "sglang:memha_handshake_refusals_total", reason="malformed") == 1
    metrics.checksum_failed()
    assert value(registry, "sglang:memha_kv_checksum_failures_total") == 1
    metrics.pages_converted("bf16", "fp8_e4m3", 5)
    metrics.pages_converted("bf16", "fp8_e4m3", 2)
    assert value(registry, "sglang:memha_send_converted_pages_total", from_format="bf16", to_format="fp8_e4m3") == 7
    assert value(registry, "sglang:memha_kv_pool_capacity_tokens", format="fp8_e4m3") == 4096


def test_transfer_line_and_counters_carry_the_same_figures(registry, monkeypatch, caplog):
    """The prefill's accounting point (``conn_bytes._log_room``): what the line says is what
    ``/metrics`` adds, and the line's format is the label."""
    metrics.start(LABELS, "fp8_e4m3", 4096, registry)
    monkeypatch.setattr(mc.MooncakeKVManager, "_transfer_data", lambda self, session, blocks: 0)
    mgr = object.__new__(MemhaKVManager)
    mgr._init_room_stats()
    mgr.memha_desc, mgr.memha_stock, mgr.request_status = desc(), False, {}
    for room, pages, piped in ((1, 3, 2), (2, 1, 0)):
        mgr._memha_tls.room, mgr._memha_tls.phase = room, "kv"
        stats = mgr._room_stats()
        stats.pages, stats.pipelined_pages = pages, piped
        mgr._transfer_data("s", [(0, 0, 1000 * pages), (0, 0, 24)])
        mgr._memha_tls.phase = None
        mgr._transfer_data("s", [(0, 0, 7)])  # aux: in total_bytes, not in the KV counter
    with caplog.at_level(logging.WARNING, logger="sglang_memha"):
        mgr._log_room(1, "ok")
        mgr._log_room(2, "failed")
    rows = transfer_rows(caplog.text)
    assert [(r.fmt, r.kv_bytes) for r in rows] == [("fp8_e4m3", 3024), ("fp8_e4m3", 1024)]
    assert value(registry, "sglang:memha_kv_sent_bytes_total", format="fp8_e4m3") == 3024 + 1024
    assert value(registry, "sglang:memha_kv_sent_pages_total", format="fp8_e4m3") == 4
    assert value(registry, "sglang:memha_kv_pipelined_pages_total", format="fp8_e4m3") == 2
    assert value(registry, "sglang:memha_kv_transfer_seconds_count", format="fp8_e4m3") == 1  # ok rows only


def test_converted_sends_count_their_pages_failed_ones_do_not(registry):
    metrics.start(LABELS, "bf16", 4096, registry)
    mgr = object.__new__(MemhaKVManager)
    mgr._init_room_stats()
    mgr.memha_desc = desc(fmt="bf16")
    status = iter([0, -1])
    mgr.memha_converter = SimpleNamespace(send=lambda *a, **k: next(status))
    for _ in range(2):
        mgr._send_converted("s", np.array([3, 4, 9]), [0], np.array([0, 1, 2]), desc(), 1)
    assert value(registry, "sglang:memha_send_converted_pages_total", from_format="bf16",
                 to_format="fp8_e4m3") == 3


def test_refusals_name_their_kind_and_pickle_as_plain_text():
    local = desc()
    cases = {
        "no_descriptor": handshake.check_prefill_peer(local, None, "p"),
        "malformed": handshake.check_decode_peer(local, handshake.FRAME_PREFIX + b"{", "d"),
        "format_mismatch": handshake.check_prefill_peer(local, handshake.encode_layout(desc(fmt="int4_kivi")), "p"),
        "auth": handshake.check_prefill_peer(local, handshake.encode_layout(local), "p", secret="k1"),
        "unregistered_session": handshake.check_room_message(
            [b"21", b"h", b"1", b"s", b"", b"0", b"", b"1"], None, set(), set()),
    }
    for kind, reason in cases.items():
        assert isinstance(reason, handshake.Refusal) and reason.kind == kind, (kind, reason)
        assert set(cases) | {"unsupported_bridge", "conversion", "prefill_layout"} == set(handshake.REFUSAL_KINDS)
        back = pickle.loads(pickle.dumps(reason))
        assert type(back) is str and back == reason
    with pytest.raises(ValueError, match="refusal kind"):
        handshake.Refusal("typo", "x")


def test_a_refused_prefill_counts_once_however_often_sglang_asks(registry):
    metrics.start({**LABELS, "engine_type": "decode"}, "fp8_e4m3", 4096, registry)
    mgr = object.__new__(MemhaKVManager)
    mgr.memha_refused_prefills = {}
    for _ in range(3):  # SGLang retries try_ensure_parallel_info until it gives up
        mgr._refuse_prefill("10.0.0.1:8998", "Page size mismatch: 16 vs 32")
    mgr._refuse_prefill("10.0.0.1:8998", "KV cache dtype mismatch")  # another reason: counted
    got = registry.get_sample_value("sglang:memha_handshake_refusals_total",
                                    {**BASE, "engine_type": "decode", "reason": "prefill_layout"})
    assert got == 2


def test_decode_request_refused_at_init_is_counted(registry, monkeypatch):
    metrics.start({**LABELS, "engine_type": "decode"}, "fp8_e4m3", 4096, registry)
    monkeypatch.setattr(mc.MooncakeKVReceiver, "init", lambda self, rank: None)
    mgr = object.__new__(MemhaKVManager)
    mgr.memha_desc, mgr.memha_secret, mgr.attn_tp_size = desc(), None, 1  # as SGLang's manager sets it
    mgr.prefill_info_table = {"p:1": SimpleNamespace(kv_layout=handshake.encode_layout(desc(fmt="int4_kivi")))}
    failed = []
    mgr.record_failure = lambda room, reason: failed.append(reason)
    mgr.update_status = lambda room, status: None
    rec = object.__new__(MemhaKVReceiver)
    rec.kv_mgr, rec.bootstrap_addr, rec.bootstrap_room, rec.conclude_state = mgr, "p:1", 5, None
    rec.ensure_abort_notified = lambda: None
    rec.init(0)
    assert len(failed) == 1
    got = registry.get_sample_value("sglang:memha_handshake_refusals_total",
                                    {**BASE, "engine_type": "decode", "reason": "format_mismatch"})
    assert got == 1


def _receiver(prefill_page: int, decode_page: int = 16, item_lens=(1024, 64, 1024, 64)):
    mgr = SimpleNamespace(kv_args=SimpleNamespace(kv_item_lens=list(item_lens), page_size=decode_page),
                          prefill_info_table={"p:1": SimpleNamespace(page_size=prefill_page)},
                          memha_desc=desc(page_size=decode_page), memha_stock=False)
    rec = object.__new__(MemhaKVReceiver)
    rec.kv_mgr, rec.bootstrap_addr = mgr, "p:1"
    return rec


def test_received_bytes_are_the_pages_the_prefill_filled(registry, monkeypatch):
    metrics.start({**LABELS, "engine_type": "decode"}, "fp8_e4m3", 4096, registry)
    monkeypatch.setattr(mc.MooncakeKVReceiver, "send_metadata", lambda self, *a, **k: None)
    rec = _receiver(prefill_page=16)
    rec.send_metadata(np.arange(3), 7, None, decode_prefix_len=0)
    req = SimpleNamespace(origin_input_ids=list(range(40)))
    assert arrival.count_arrived(None, SimpleNamespace(req=req, kv_receiver=rec)) is None  # args unchanged
    page_bytes = 1024 + 64 + 1024 + 64
    got = lambda fmt: registry.get_sample_value("sglang:memha_kv_received_bytes_total",  # noqa: E731
                                                {**BASE, "engine_type": "decode", "format": fmt})
    assert got("fp8_e4m3") == 3 * page_bytes  # whole pages, as a same-page-size prefill sends them
    # a re-paged prefill (page 32 -> 16) writes the prompt's token rows after the decode's prefix
    rec = _receiver(prefill_page=32)
    rec.send_metadata(np.arange(2), 7, None, decode_prefix_len=16)
    arrival.count_arrived(None, SimpleNamespace(req=req, kv_receiver=rec))
    assert got("fp8_e4m3") == 3 * page_bytes + (40 - 16) * page_bytes // 16
    # an fnuz prefill: the bytes crossed as fnuz (converted on arrival)
    rec = _receiver(prefill_page=16)
    rec.memha_wire_fmt = "fp8_e4m3fnuz"
    rec.send_metadata(np.arange(1), 7, None, decode_prefix_len=0)
    arrival.count_arrived(None, SimpleNamespace(req=req, kv_receiver=rec))
    assert got("fp8_e4m3fnuz") == page_bytes
    # SGLang's fake transfers (warm-up: not a memha receiver) are not counted
    arrival.count_arrived(None, SimpleNamespace(req=req, kv_receiver=object()))
    assert got("fp8_e4m3") == 3 * page_bytes + (40 - 16) * page_bytes // 16


def test_checksum_failure_on_arrival_is_counted_a_match_is_not(registry, monkeypatch):
    from sglang.srt.disaggregation import checksum, decode

    metrics.start({**LABELS, "engine_type": "decode"}, "fp8_e4m3", 4096, registry)
    monkeypatch.setattr(checksum, "page_indices_for_request", lambda *a, **k: np.arange(2))
    monkeypatch.setattr(decode, "_bootstrap_addr", lambda req: "p:1")
    mgr = SimpleNamespace(should_verify_kv_checksum=lambda addr: True)
    sched = SimpleNamespace(kv_checksum_computer=SimpleNamespace(compute=lambda pages, state: 0x55),
                            attn_tp_size=1, disagg_decode_prealloc_queue=SimpleNamespace(kv_manager=mgr))

    def req(expected):
        return SimpleNamespace(expected_kv_checksum=expected, rid="r", bootstrap_room=3,
                               origin_input_ids=[1] * 20, kv=SimpleNamespace(cache_protected_len=0))

    assert integrity.verify_on_arrival(sched, req(0x55)) is None
    assert "KV checksum mismatch" in integrity.verify_on_arrival(sched, req(0x56))
    integrity.count_batch_entry_failure(None, req(0), "msg")  # SGLang's own check at batch entry
    got = registry.get_sample_value("sglang:memha_kv_checksum_failures_total",
                                    {**BASE, "engine_type": "decode"})
    assert got == 2
