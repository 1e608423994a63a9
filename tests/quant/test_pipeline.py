"""``LayerPipeline`` without servers: plan, per-layer sends, claim, failure paths.

The fake manager's ``_transfer_data`` really copies bytes (``ctypes.memmove``) between two
numpy "pools" laid out like SGLang's: one buffer per (K|V, layer), ``item`` bytes per page. So
every test can assert exact bytes on the decode side, and that nothing else was written.
"""
from __future__ import annotations

import ctypes
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("sglang")
from sglang.srt.disaggregation.base.conn import KVPoll  # noqa: E402

from sglang_memha.sglang_ext.transfer.pipeline import LayerPipeline, around_run_batch  # noqa: E402

LAYERS, PAGE, POOL_PAGES = 3, 16, 32
# Format v4 entries [K data, K scale, V data, V scale] x layers; ITEMS: bytes of one page of each
ITEMS = ([48] * LAYERS + [16] * LAYERS) * 2
ENTRIES = len(ITEMS)
SESSION, SESSION_B = "10.0.0.2:1234", "10.0.0.3:1234"


class FakeManager:
    """The slice of ``MooncakeKVManager`` that ``LayerPipeline`` touches."""

    def __init__(self, fail_layer: int | None = None):
        rng = np.random.default_rng(0)
        self.src = [rng.integers(0, 256, POOL_PAGES * item, dtype=np.uint8) for item in ITEMS]
        self.dst = [np.zeros(POOL_PAGES * item, dtype=np.uint8) for item in ITEMS]
        self.kv_args = SimpleNamespace(kv_data_ptrs=[a.ctypes.data for a in self.src], kv_item_lens=list(ITEMS))
        self.memha_desc = SimpleNamespace(num_layers=LAYERS)
        self.request_status: dict[int, int] = {}
        self.transfer_infos: dict[int, dict] = {}
        self.dst_b = [np.zeros(POOL_PAGES * item, dtype=np.uint8) for item in ITEMS]
        self.decode_kv_args_table = {s: SimpleNamespace(
            dst_kv_ptrs=[a.ctypes.data for a in pool], dst_attn_tp_size=1, requires_dcp_relayout=False)
            for s, pool in ((SESSION, self.dst), (SESSION_B, self.dst_b))}
        self.acks: list[int] = []  # rooms SGLang's drain check was re-run for
        self.poisoned: list[int] = []
        self.failed_sessions: set[str] = set()
        self.memha_send_targets: dict = {}  # sessions converted on send (none here)
        self.attn_tp_size = 1
        self._memha_tls = threading.local()
        self.fail_layer = fail_layer
        self.calls: list[tuple[int, str | None]] = []  # (room the call was accounted to, phase)

    def _maybe_ack_drained_abort(self, room):
        self.acks.append(room)

    def _poison_unsettled_send(self, room):
        self.poisoned.append(room)

    def check_status(self, room):
        return self.request_status[room]

    def _transfer_data(self, session, blocks):
        self.calls.append((getattr(self._memha_tls, "room", None), getattr(self._memha_tls, "phase", None)))
        layer_of = {a.ctypes.data: i for i, a in enumerate(self.src)}
        for src, dst, n in blocks:
            base = max(p for p in layer_of if p <= src)
            if self.fail_layer is not None and layer_of[base] % LAYERS == self.fail_layer:
                return -1
            ctypes.memmove(dst, src, n)
        return 0

    def add_room(self, room: int, dst_pages: list[int], session: str = SESSION):
        self.request_status[room] = KVPoll.WaitingForInput
        self.transfer_infos[room] = {session: SimpleNamespace(
            is_dummy=False, required_dst_info_num=1, dst_device_kv_indices=None,
            dst_kv_indices=np.array(dst_pages, dtype=np.int32))}


def _req(room: int, slots: list[int], prompt_len: int):
    row = torch.zeros(1, 256, dtype=torch.int64)
    row[0, :len(slots)] = torch.tensor(slots)
    return SimpleNamespace(bootstrap_room=room, disagg_kv_sender=object(), pending_bootstrap=False,
                           origin_input_ids=list(range(prompt_len)), disagg_decode_prefix_len=0,
                           kv=SimpleNamespace(req_pool_idx=0)), row


def _forward(pipe, req, row, prefix, extend, layers=range(LAYERS), one_call_per_layer=False):
    """One extend forward as the scheduler runs it: plan, one signal per written layer, close.
    ``one_call_per_layer``: wait for each layer's send before the next signal (no coalescing)."""
    batch = SimpleNamespace(reqs=[req], prefix_lens=[prefix], extend_lens=[extend])
    plan = pipe.plan_batch(batch, row, PAGE)
    if plan is not None:
        for layer in layers:
            before = len(pipe.mgr.calls)
            plan.layer_written(layer)
            while (one_call_per_layer and len(pipe.mgr.calls) == before
                   and all(rp.failure is None for rp in plan.reqs)):
                threading.Event().wait(0.005)
        pipe.close(plan)
        for rp in plan.reqs:
            assert rp.done.wait(10)
    return plan


def _slots(pages: list[int], tokens: int) -> list[int]:
    return [pages[t // PAGE] * PAGE + t % PAGE for t in range(tokens)]


def _page_bytes(pool, layer_buf: int, page: int) -> bytes:
    item = ITEMS[layer_buf]
    return pool[layer_buf][page * item:(page + 1) * item].tobytes()


def _assert_landed(mgr, src_pages, dst_pages):
    for buf in range(ENTRIES):
        for s, d in zip(src_pages, dst_pages):
            assert _page_bytes(mgr.dst, buf, d) == _page_bytes(mgr.src, buf, s), (buf, s, d)


def _untouched(mgr, dst_pages) -> bool:
    others = [p for p in range(POOL_PAGES) if p not in dst_pages]
    return all(not mgr.dst[b][p * ITEMS[b]:(p + 1) * ITEMS[b]].any() for b in range(ENTRIES) for p in others)


def test_whole_forward_pipelined_then_claimed():
    mgr = FakeManager()
    pipe = LayerPipeline(mgr, min_tokens=0)
    src_pages, dst_pages = [5, 6, 7, 9], [20, 21, 3, 4]  # two contiguous runs on each side
    mgr.add_room(7, dst_pages)
    req, row = _req(7, _slots(src_pages, 60), 60)
    plan = _forward(pipe, req, row, 0, 60)
    assert plan is not None and plan.reqs[0].complete
    _assert_landed(mgr, src_pages, dst_pages)
    assert _untouched(mgr, dst_pages)
    # K and V of 2 runs per layer; layers already written when the sender is free go out in
    # one call; every call is accounted to room 7 as KV
    assert 1 <= len(mgr.calls) <= LAYERS and set(mgr.calls) == {(7, "kv")}
    rest_s, rest_d, status = pipe.claim(7, SESSION, np.array(src_pages), np.array(dst_pages))
    assert status == 0 and len(rest_s) == 0 and len(rest_d) == 0
    # A second claim of the same pages (should not happen) finds nothing: sent the stock way.
    rest_s, _, status = pipe.claim(7, SESSION, np.array(src_pages), np.array(dst_pages))
    assert status == 0 and rest_s.tolist() == src_pages


def _two_page_plan(mgr):
    """Room 9: one 32-token request on prefill pages 5, 6 -> decode pages 1, 2, planned."""
    pipe = LayerPipeline(mgr, min_tokens=0)
    src_pages, dst_pages = [5, 6], [1, 2]
    mgr.add_room(9, dst_pages)
    req, row = _req(9, _slots(src_pages, 32), 32)
    plan = pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[32]), row, PAGE)
    return pipe, plan, src_pages, dst_pages


def test_layers_queued_behind_a_slow_call_go_out_in_one_call():
    """While layer 0 is on the wire, layers 1 and 2 are written: they share the next call."""
    mgr = FakeManager()
    gate = threading.Event()
    copy = mgr._transfer_data

    def slow_first_call(session, blocks):
        if not mgr.calls:
            gate.wait(10)
        return copy(session, blocks)

    mgr._transfer_data = slow_first_call
    pipe, plan, src_pages, dst_pages = _two_page_plan(mgr)
    plan.layer_written(0)
    while plan.workers[0].queue.qsize():  # the sender took layer 0 and is blocked in its call
        threading.Event().wait(0.005)
    for layer in range(1, LAYERS):
        plan.layer_written(layer)
    gate.set()
    pipe.close(plan)
    assert plan.reqs[0].done.wait(10) and plan.reqs[0].complete
    assert len(mgr.calls) == 2
    _assert_landed(mgr, src_pages, dst_pages)


def test_sender_waits_for_the_layer_marker_before_reading_pages(monkeypatch):
    """On GPU a layer's writes may still be queued when it is signalled: the sender must wait on
    the marker (a CUDA event there) before any byte of that layer goes to the transfer engine."""
    from sglang_memha.sglang_ext.transfer import pipeline

    gate, waited = threading.Event(), []

    class GatedMarker:
        def __init__(self, layer):
            self.layer = layer

        def wait(self):
            waited.append(self.layer)
            assert gate.wait(10)

    monkeypatch.setattr(pipeline.LayerWritten, "record", classmethod(lambda cls, layer, dev: GatedMarker(layer)))
    mgr = FakeManager()
    pipe, plan, src_pages, dst_pages = _two_page_plan(mgr)
    plan.layer_written(0)
    while not waited:
        threading.Event().wait(0.005)
    threading.Event().wait(0.05)
    assert mgr.calls == []  # blocked on the marker: nothing read yet
    gate.set()
    for layer in range(1, LAYERS):
        plan.layer_written(layer)
    pipe.close(plan)
    assert plan.reqs[0].done.wait(10) and plan.reqs[0].complete
    _assert_landed(mgr, src_pages, dst_pages)


def test_chunked_prefill_partial_page_is_resent_by_the_later_chunk():
    """Chunk 1 writes tokens [0, 40): pages 0, 1 and half of 2; SGLang sends pages 0-1 after it
    (page-aligned down). Chunk 2 writes [40, 70), completing page 2; its plan ships page 2 again
    and the last send (pages 2-4) finds all three shipped."""
    mgr = FakeManager()
    pipe = LayerPipeline(mgr, min_tokens=0)
    src_pages, dst_pages = [1, 2, 3, 4, 5], [10, 11, 12, 13, 14]
    mgr.add_room(3, dst_pages)
    req, row = _req(3, _slots(src_pages, 70), 70)
    _forward(pipe, req, row, 0, 40)
    rest, _, status = pipe.claim(3, SESSION, np.array([1, 2]), np.array([10, 11]))
    assert status == 0 and len(rest) == 0
    for buf in range(ENTRIES):  # chunk 2's forward writes the second half of page 3
        mgr.src[buf][3 * ITEMS[buf] + ITEMS[buf] // 2:4 * ITEMS[buf]] ^= 0xFF
    _forward(pipe, req, row, 40, 30)
    rest, _, status = pipe.claim(3, SESSION, np.array([3, 4, 5]), np.array([12, 13, 14]))
    assert status == 0 and len(rest) == 0
    _assert_landed(mgr, src_pages, dst_pages)  # page 3 holds chunk 2's bytes, not the stale half


def test_layers_never_signalled_fall_back_to_stock_send():
    mgr = FakeManager()
    pipe = LayerPipeline(mgr, min_tokens=0)
    mgr.add_room(1, [0, 1])
    req, row = _req(1, _slots([4, 5], 20), 20)
    plan = _forward(pipe, req, row, 0, 20, layers=[0, 1])  # layer 2 never wrote
    assert not plan.reqs[0].complete and plan.reqs[0].failure is None
    rest_s, rest_d, status = pipe.claim(1, SESSION, np.array([4, 5]), np.array([0, 1]))
    assert status == 0 and rest_s.tolist() == [4, 5] and rest_d.tolist() == [0, 1]


def test_failed_layer_fails_the_chunk():
    mgr = FakeManager(fail_layer=1)
    pipe = LayerPipeline(mgr, min_tokens=0)
    mgr.add_room(2, [0, 1])
    req, row = _req(2, _slots([4, 5], 20), 20)
    plan = _forward(pipe, req, row, 0, 20, one_call_per_layer=True)
    assert "layers [1]" in plan.reqs[0].failure
    assert len(mgr.calls) == 2  # layer 0 sent, layer 1 failed, layer 2 signalled but not sent
    assert plan.reqs[0].layers_sent == {SESSION: {0}}
    assert mgr.poisoned == [2]  # Mooncake may still write after a failed call: no abort ack
    _, _, status = pipe.claim(2, SESSION, np.array([4, 5]), np.array([0, 1]))
    assert status == -1


def test_dead_session_does_not_stall_another_sessions_requests():
    """Room 1 goes to a decode whose link hangs (its call blocks); room 2, planned in the same
    forward for another decode, lands and completes meanwhile."""
    mgr = FakeManager()
    gate = threading.Event()
    copy = mgr._transfer_data
    mgr._transfer_data = lambda session, blocks: (gate.wait(10) and -1) if session == SESSION \
        else copy(session, blocks)
    pipe = LayerPipeline(mgr, min_tokens=0)
    mgr.add_room(1, [0, 1])
    mgr.add_room(2, [6, 7], session=SESSION_B)
    req1, row = _req(1, _slots([4, 5], 20), 20)
    req2, row2 = _req(2, _slots([8, 9], 20), 20)
    row = torch.cat([row, row2])
    req2.kv.req_pool_idx = 1
    plan = pipe.plan_batch(SimpleNamespace(reqs=[req1, req2], prefix_lens=[0, 0], extend_lens=[20, 20]),
                           row, PAGE)
    for layer in range(LAYERS):
        plan.layer_written(layer)
    pipe.close(plan)
    rp1, rp2 = plan.reqs
    assert rp2.done.wait(10) and rp2.complete and not rp1.done.is_set()
    for buf in range(ENTRIES):
        for s_, d in ((8, 6), (9, 7)):
            assert mgr.dst_b[buf][d * ITEMS[buf]:(d + 1) * ITEMS[buf]].tobytes() == _page_bytes(mgr.src, buf, s_)
    assert pipe.in_flight(1) and not pipe.in_flight(2)
    gate.set()
    assert rp1.done.wait(10) and "failed" in rp1.failure and not pipe.in_flight(1)


def test_abort_ack_waits_for_layers_on_the_wire():
    """A decode's abort is acked (and its pages reused) only after the room's pipelined writes
    stopped: the pipeline re-runs SGLang's drain check when the room's last plan is done."""
    mgr = FakeManager()
    gate = threading.Event()
    copy = mgr._transfer_data
    mgr._transfer_data = lambda session, blocks: gate.wait(10) and copy(session, blocks)
    pipe = LayerPipeline(mgr, min_tokens=0)
    mgr.add_room(4, [0, 1])
    req, row = _req(4, _slots([4, 5], 20), 20)
    plan = pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20]), row, PAGE)
    plan.layer_written(0)
    assert pipe.in_flight(4) and mgr.acks == []
    mgr.request_status[4] = KVPoll.Failed  # the decode aborted the room
    pipe.close(plan)
    gate.set()
    assert plan.reqs[0].done.wait(10)
    assert not pipe.in_flight(4) and mgr.acks == [4]


def test_room_failed_while_layers_in_flight_stops_sending():
    mgr = FakeManager()
    pipe = LayerPipeline(mgr, min_tokens=0)
    mgr.add_room(4, [0, 1])
    req, row = _req(4, _slots([4, 5], 20), 20)
    batch = SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20])
    plan = pipe.plan_batch(batch, row, PAGE)
    plan.layer_written(0)
    for _ in range(1000):  # let the sender thread ship layer 0 first
        if mgr.calls:
            break
        threading.Event().wait(0.01)
    mgr.request_status[4] = KVPoll.Failed  # e.g. the client aborted
    plan.layer_written(1)
    pipe.close(plan)
    assert plan.reqs[0].done.wait(10)
    assert plan.reqs[0].aborted and plan.reqs[0].failure is None and len(mgr.calls) == 1
    rest, _, status = pipe.claim(4, SESSION, np.array([4, 5]), np.array([0, 1]))
    assert status == 0 and len(rest) == 0  # no -1: that would mark the decode session dead


def test_ineligible_requests_are_not_planned():
    mgr = FakeManager()
    pipe = LayerPipeline(mgr, min_tokens=64)
    mgr.add_room(5, [0, 1])
    req, row = _req(5, _slots([4, 5], 20), 20)  # 20 < min_tokens
    assert pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20]), row, PAGE) is None
    pipe.min_tokens = 0
    mgr.transfer_infos.pop(5)  # destination not known yet: whole-request send later
    assert pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20]), row, PAGE) is None
    mgr.add_room(5, [0, 1])
    req.pending_bootstrap = True
    assert pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20]), row, PAGE) is None
    req.pending_bootstrap = False
    mgr.memha_send_targets[SESSION] = object()  # pages converted on send: the stock send's job
    assert pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20]), row, PAGE) is None
    mgr.memha_send_targets.clear()
    assert pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20]), row, PAGE) is not None
    pipe.forget(5)
    mgr.transfer_infos[5][SESSION].is_dummy = True
    assert pipe.plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20]), row, PAGE) is None
    assert mgr.calls == [] and pipe.claim(5, SESSION, np.array([4]), np.array([0]))[0].tolist() == [4]


def test_claim_with_another_destination_sends_stock_and_forget_clears():
    mgr = FakeManager()
    pipe = LayerPipeline(mgr, min_tokens=0)
    mgr.add_room(6, [0, 1])
    req, row = _req(6, _slots([4, 5], 20), 20)
    _forward(pipe, req, row, 0, 20)
    rest_s, rest_d, status = pipe.claim(6, SESSION, np.array([4, 5]), np.array([0, 9]))
    assert status == 0 and rest_s.tolist() == [5] and rest_d.tolist() == [9]
    pipe.forget(6)
    assert pipe.claim(6, SESSION, np.array([4, 5]), np.array([0, 1]))[0].tolist() == [4, 5]


class _Pool:
    memha_layer_listener = None


def _scheduler(pipe, batch_reqs):
    pool = _Pool()
    return pool, SimpleNamespace(
        disagg_prefill_bootstrap_queue=SimpleNamespace(kv_manager=SimpleNamespace(memha_pipeline=pipe)),
        token_to_kv_pool_allocator=SimpleNamespace(get_kvcache=lambda: pool, page_size=PAGE),
        req_to_token_pool=SimpleNamespace(req_to_token=batch_reqs))


def test_around_run_batch_attaches_listener_for_the_forward_only():
    mgr = FakeManager()
    pipe = LayerPipeline(mgr, min_tokens=0)
    mgr.add_room(8, [0, 1])
    req, row = _req(8, _slots([4, 5], 20), 20)
    pool, sched = _scheduler(pipe, row)
    batch = SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[20],
                            forward_mode=SimpleNamespace(is_extend=lambda: True))

    def forward(s, b):
        assert pool.memha_layer_listener is not None
        for layer in range(LAYERS):
            pool.memha_layer_listener(layer)
        raise RuntimeError("forward died")

    with pytest.raises(RuntimeError, match="forward died"):
        around_run_batch(forward, sched, batch)
    assert pool.memha_layer_listener is None
    rest, _, status = pipe.claim(8, SESSION, np.array([4, 5]), np.array([0, 1]))
    assert status == 0 and len(rest) == 0  # every layer was written before the error
    # A decode scheduler has no prefill bootstrap queue: plain pass-through.
    assert around_run_batch(lambda s, b: "ran", SimpleNamespace(), batch) == "ran"
