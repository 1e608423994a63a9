"""Compute-transfer pipeline (``MEMHA_PIPELINE=1``, prefill server): ship each layer's KV
while later layers still compute.

Data flow in one prefill scheduler process::

  Scheduler.run_batch  (AROUND ``around_run_batch``, scheduler thread)
    plan_batch(): for each request of the extend batch whose decode destination is known,
      the pages this forward writes and, per decode session, the decode pages they land on;
      each (room, page) is entered in the manager's pipelined registry
    pool.memha_layer_listener = plan.layer_written
      model forward: pool.set_kv_buffer(layer L) -> plan.layer_written(L) -> session queues
    after the forward: session queues <- close(plan)

  _SessionWorker thread (one per decode session, so a dead peer stalls only its own requests)
    layer L: per request bound to that session, the K and V rows of layer L merged into
      contiguous runs, one Mooncake ``batch_transfer_sync`` (through
      ``MooncakeKVManager._transfer_data``; it releases the GIL, so layer L+1 computes meanwhile).
      Layers that queued up while the previous call was on the wire go out together in one call:
      each call costs a fixed ~40-80 ms on Mooncake TCP (measured), which per-layer calls of a
      short prompt cannot amortize
    close: each request plan is done once all its sessions closed: complete (every layer
      sent), incomplete, or failed. Until then the room counts as in flight, and SGLang's
      ack of a decode's abort (which lets the decode reuse the pages) waits for it

  MooncakeKVManager.send_kvcache  (SGLang's normal send after the forward, transfer worker)
    ``LayerPipeline.claim``: pages a plan shipped to the same destination are waited for and
      dropped from the stock send; pages of an incomplete plan, and every page no plan covers
      (radix-cache prefix, late destination, short prompt) go the stock way; a failed plan
      fails the chunk (SGLang's ``conclude_failure`` -> ``KVPoll.Failed``, pages freed both sides)

So completion stays SGLang's: the aux metadata and ``Success`` go out after the last chunk's
send, i.e. only after every layer of every chunk landed. On CPU a layer's writes are finished
when ``set_kv_buffer`` returns; on a GPU the listener records a CUDA event there and the sender
thread waits on it before reading the pages (``layer_signal.LayerWritten``).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from sglang.srt.disaggregation.base.conn import KVPoll
from sglang.srt.disaggregation.common.utils import group_concurrent_contiguous

from sglang_memha.kvformat.layout import layer_of_entries, page_blocks
from sglang_memha.sglang_ext.transfer.layer_signal import LayerWritten

logger = logging.getLogger("sglang_memha")

CLAIM_TIMEOUT_S = 300.0  # a plan not closed by then means the forward died: fail the chunk
_ACTIVE = (KVPoll.WaitingForInput, KVPoll.Transferring)


@dataclass
class _SessionRuns:
    """Where one request's pages of this forward go on one decode session.

    ``runs``: [n, 3] int64 rows (first src page, first dst page, pages), contiguous on both sides.
    ``entries``: per pool-local layer, its published buffers as (src base, dst base, bytes per
    page): K and V data, and their scale rows in format v4 (``kvformat/layout.py``).
    """
    session: str
    runs: np.ndarray
    entries: list[list[tuple[int, int, int]]]

    def layer_blocks(self, layer: int) -> list[tuple[int, int, int]]:
        """Mooncake blocks (src addr, dst addr, bytes) of every buffer of layer ``layer``."""
        return [b for src, dst, item in self.entries[layer] for b in page_blocks(src, dst, item, self.runs)]


def layer_entries(src_ptrs: list[int], dst_ptrs: list[int], item_lens: list[int],
                  num_layers: int) -> list[list[tuple[int, int, int]]]:
    """Both sides' published entries (same format, same order) grouped by pool-local layer."""
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(num_layers)]
    for i, layer in enumerate(layer_of_entries(len(src_ptrs), num_layers)):
        out[layer].append((src_ptrs[i], dst_ptrs[i], item_lens[i]))
    return out


@dataclass
class RequestPlan:
    """One request's share of one forward. ``done`` is set once every session worker of the
    request processed the forward's close (``closes_left`` reaches 0)."""
    room: int
    sessions: list[_SessionRuns]
    num_layers: int
    layers_sent: dict = field(default_factory=dict)  # session -> set of layers landed there
    failure: str | None = None  # a transfer failed: the chunk fails (KVPoll.Failed)
    aborted: bool = False  # the room failed or was aborted meanwhile: sending stopped, no error
    closes_left: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    @property
    def complete(self) -> bool:
        return self.failure is None and not self.aborted and all(
            len(self.layers_sent.get(s.session, ())) == self.num_layers for s in self.sessions)


@dataclass
class BatchPlan:
    reqs: list[RequestPlan]
    workers: list["_SessionWorker"]
    device: torch.device | None = None  # the KV pool's; "cuda" makes each layer signal an event

    def layer_written(self, layer: int) -> None:
        """Called by ``MemhaQuantKVPool.set_kv_buffer`` (scheduler thread, once per layer per
        forward) after layer ``layer``'s writes were issued; never blocks. On GPU the writes may
        still be queued on the stream: the marker lets the sender wait for them."""
        marker = LayerWritten.record(layer, self.device)
        if marker is None:
            return  # CUDA graph capture: left unsignalled, sent whole after the forward
        for w in self.workers:
            w.queue.put(("layer", self, marker))


@dataclass
class _PageEntry:
    plan: RequestPlan
    dst: dict  # session -> dst page, removed as each session's stock send claims it


class _SessionWorker:
    """Sender thread of one decode session. One per session, so a peer whose link is dead
    (Mooncake TCP gives up after 30 s without progress) delays only its own requests."""

    def __init__(self, pipe: "LayerPipeline", session: str):
        self.pipe, self.session = pipe, session
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name=f"memha-pipeline-{session}", daemon=True).start()

    def _mine(self, plan: BatchPlan):
        for rp in plan.reqs:
            for s in rp.sessions:
                if s.session == self.session:
                    yield rp, s

    def _run(self) -> None:
        pending = None
        while True:
            kind, plan, marker = pending or self.queue.get()
            pending = None
            try:
                if kind == "layer":
                    markers = [marker]
                    while True:  # coalesce the layers of this forward that are already signalled
                        try:
                            nxt = self.queue.get_nowait()
                        except queue.Empty:
                            break
                        if nxt[0] == "layer" and nxt[1] is plan:
                            markers.append(nxt[2])
                        else:
                            pending = nxt
                            break
                    markers[-1].wait()  # one stream: the newest event covers the older ones
                    layers = [m.layer for m in markers]
                    for rp, s in self._mine(plan):
                        self.pipe._send_layers(rp, s, layers)
            except Exception as e:  # never let the thread die: fail the plans it was serving
                logger.exception("sglang-memha pipeline: %s", e)
                for rp, _ in self._mine(plan):
                    rp.failure = rp.failure or f"pipeline sender error: {e}"
            if kind == "close":
                for rp, _ in self._mine(plan):
                    self.pipe._session_closed(rp)


class LayerPipeline:
    """Per-layer senders and pipelined-page registry of one ``MemhaKVManager`` (prefill)."""

    def __init__(self, mgr, min_tokens: int):
        self.mgr = mgr
        self.min_tokens = min_tokens
        self._lock = threading.Lock()
        self._registry: dict[int, dict[int, _PageEntry]] = {}
        self._workers: dict[str, _SessionWorker] = {}
        self._in_flight: dict[int, int] = {}  # room -> request plans not yet done

    # ---- scheduler thread: plan ------------------------------------------------------------
    def plan_batch(self, batch, req_to_token, page_size: int) -> BatchPlan | None:
        """Plan one extend forward (scheduler thread, before the forward). Requests not eligible
        are left out and sent whole after the forward by SGLang's path."""
        self._sweep()
        prefix_lens, extend_lens = batch.prefix_lens, batch.extend_lens
        reqs = []
        for i, req in enumerate(batch.reqs):
            plan = self._plan_request(req, int(prefix_lens[i]), int(extend_lens[i]),
                                      req_to_token, page_size)
            if plan is not None:
                reqs.append(plan)
        if not reqs:
            return None
        with self._lock:
            sessions = dict.fromkeys(s.session for rp in reqs for s in rp.sessions)
            workers = [self._workers.get(s) or self._workers.setdefault(s, _SessionWorker(self, s))
                       for s in sessions]
        return BatchPlan(reqs=reqs, workers=workers)

    def _sweep(self) -> None:
        """Drop registry rooms SGLang already cleared (a room can end without a conclude, e.g.
        an abort while its chunk was skipped), so the registry cannot grow without bound."""
        with self._lock:
            for room in [r for r in self._registry if r not in self.mgr.request_status]:
                del self._registry[room]

    def _plan_request(self, req, prefix_len, extend_len, req_to_token, page_size):
        mgr = self.mgr
        room = getattr(req, "bootstrap_room", None)
        if (room is None or getattr(req, "disagg_kv_sender", None) is None
                or getattr(req, "pending_bootstrap", False) or extend_len <= 0
                or len(req.origin_input_ids) < self.min_tokens):
            return None
        if room not in mgr.request_status or mgr.check_status(room) not in _ACTIVE:
            return None
        infos = mgr.transfer_infos.get(room)
        if not infos:
            return None  # destination not known yet: whole-request send after the forward
        base = int(getattr(req, "disagg_decode_prefix_len", 0) or 0)
        if base % page_size:
            return None
        first = max(prefix_len, base) // page_size
        last = (prefix_len + extend_len - 1) // page_size
        if last < first:
            return None
        page_pos = np.arange(first, last + 1, dtype=np.int64)
        row = req_to_token[req.kv.req_pool_idx]
        src_pages = (row[page_pos * page_size].to("cpu").numpy().astype(np.int64)) // page_size
        dst_idx = page_pos - base // page_size
        sessions, dst_by_session = [], {}
        for session, info in list(infos.items()):
            reg = mgr.decode_kv_args_table.get(session)
            if (info.is_dummy or reg is None or info.required_dst_info_num != len(infos)
                    or info.dst_device_kv_indices is not None
                    or getattr(reg, "requires_dcp_relayout", False)
                    or reg.dst_attn_tp_size != mgr.attn_tp_size
                    or session in mgr.failed_sessions
                    or session in mgr.memha_send_targets  # converted on send: the stock path
                    or dst_idx[-1] >= len(info.dst_kv_indices)
                    or len(reg.dst_kv_ptrs) != len(mgr.kv_args.kv_data_ptrs)):
                return None  # a layout the stock path handles specially: leave it to SGLang
            dst_pages = np.asarray(info.dst_kv_indices, dtype=np.int64)[dst_idx]
            dst_by_session[session] = dst_pages.tolist()
            src_groups, dst_groups = group_concurrent_contiguous(src_pages, dst_pages)
            runs = np.array([(s[0], d[0], len(s)) for s, d in zip(src_groups, dst_groups)],
                            dtype=np.int64).reshape(-1, 3)
            entries = layer_entries(mgr.kv_args.kv_data_ptrs, reg.dst_kv_ptrs, mgr.kv_args.kv_item_lens,
                                    mgr.memha_desc.num_layers)
            sessions.append(_SessionRuns(session, runs, entries))
        plan = RequestPlan(room=room, sessions=sessions, num_layers=len(sessions[0].entries),
                           closes_left=len(sessions))
        with self._lock:
            self._in_flight[room] = self._in_flight.get(room, 0) + 1
            entries = self._registry.setdefault(room, {})
            for i, p in enumerate(src_pages.tolist()):
                # A page written again by a later chunk (the partial last page) is re-planned;
                # the newer plan supersedes the older one.
                entries[p] = _PageEntry(plan, {s: d[i] for s, d in dst_by_session.items()})
        return plan

    def close(self, plan: BatchPlan) -> None:
        """Scheduler thread, after the forward (also when it raised): each session worker
        settles its share of the request plans once the layers queued before this call are sent."""
        for w in plan.workers:
            w.queue.put(("close", plan, None))

    def in_flight(self, room: int) -> bool:
        """Whether a forward's layers of ``room`` may still be written to a decode."""
        with self._lock:
            return self._in_flight.get(room, 0) > 0

    # ---- session worker threads ------------------------------------------------------------
    def _session_closed(self, rp: RequestPlan) -> None:
        with self._lock:
            rp.closes_left -= 1
            if rp.closes_left > 0:
                return
            left = self._in_flight.get(rp.room, 1) - 1
            if left > 0:
                self._in_flight[rp.room] = left
            else:
                self._in_flight.pop(rp.room, None)
        rp.done.set()
        if left <= 0:
            # SGLang acks a decode's abort only once the room's writes drained; ours count too
            # (``MemhaKVManager._maybe_ack_drained_abort`` waits for ``in_flight``).
            self.mgr._maybe_ack_drained_abort(rp.room)

    def _send_layers(self, rp: RequestPlan, s: _SessionRuns, layers: list[int]) -> None:
        mgr = self.mgr
        sent = rp.layers_sent.setdefault(s.session, set())
        layers = [layer for layer in dict.fromkeys(layers) if layer not in sent]
        if rp.failure is not None or rp.aborted or not layers:
            return
        if rp.room not in mgr.request_status or mgr.check_status(rp.room) == KVPoll.Failed:
            rp.aborted = True  # SGLang concludes the room; a -1 would also mark the session dead
            return
        if s.session in mgr.failed_sessions:
            rp.failure = f"decode session {s.session} failed earlier"
            return
        tls = mgr._memha_tls
        tls.room, tls.phase = rp.room, "kv"  # measured bytes land in this room's stats
        try:
            blocks = [b for layer in layers for b in s.layer_blocks(layer)]
            if mgr._transfer_data(s.session, blocks) != 0:
                rp.failure = f"layers {layers} transfer to {s.session} failed"
                logger.error("sglang-memha pipeline: room %s: %s", rp.room, rp.failure)
                # Mooncake may still be writing after its timeout: no drain ack for this room.
                mgr._poison_unsettled_send(rp.room)
                return
        finally:
            tls.room = tls.phase = None
        sent.update(layers)

    # ---- transfer worker: claim --------------------------------------------------------
    def claim(self, room: int, session: str, src: np.ndarray, dst: np.ndarray):
        """Called by ``MemhaKVManager.send_kvcache`` (SGLang transfer worker, blocking until
        the plans covering this chunk are closed). Returns ``(src_rest, dst_rest, status)``:
        the pages still to send the stock way, and -1 if a plan covering a page failed (a
        transfer error: SGLang then fails the room and marks the session dead). Pages of a room
        aborted meanwhile are dropped without error, as SGLang's own send would finish them."""
        with self._lock:
            entries = self._registry.get(room)
            if not entries:
                return src, dst, 0
            covered = np.zeros(len(src), dtype=bool)
            plans: dict[int, tuple[RequestPlan, list[int]]] = {}
            for i, (p, d) in enumerate(zip(src.tolist(), dst.tolist())):
                e = entries.get(int(p))
                if e is None or e.dst.get(session) != int(d):
                    continue
                del e.dst[session]
                if not e.dst:
                    del entries[int(p)]
                covered[i] = True
                plans.setdefault(id(e.plan), (e.plan, []))[1].append(i)
        for plan, idx in plans.values():
            if not plan.done.wait(CLAIM_TIMEOUT_S):
                logger.error("sglang-memha pipeline: room %s: forward not closed after %.0f s",
                             room, CLAIM_TIMEOUT_S)
                return src, dst, -1
            if plan.failure is not None:
                logger.error("sglang-memha pipeline: room %s failed: %s", room, plan.failure)
                return src, dst, -1
            if plan.aborted:
                continue  # nothing more to ship for a room that ended; SGLang's path concludes it
            if not plan.complete:
                covered[idx] = False  # some layers never signalled: send these pages stock
        rest = ~covered
        return src[rest], dst[rest], 0

    def forget(self, room: int) -> None:
        """The room concluded (success or failure): drop what is left of its registry."""
        with self._lock:
            self._registry.pop(room, None)


def around_run_batch(original, scheduler, batch, *args, **kwargs):
    """AROUND ``Scheduler.run_batch`` (prefill scheduler thread): attach a per-layer plan to
    the KV pool for the duration of an extend forward; no plan, no change."""
    plan = pool = pipe = None
    if batch is not None and batch.forward_mode.is_extend():
        try:
            queue_ = getattr(scheduler, "disagg_prefill_bootstrap_queue", None)  # prefill only
            pipe = getattr(getattr(queue_, "kv_manager", None), "memha_pipeline", None)
            if pipe is not None:
                pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
                plan = pipe.plan_batch(batch, scheduler.req_to_token_pool.req_to_token,
                                       scheduler.token_to_kv_pool_allocator.page_size)
        except Exception as e:  # planning is an optimization: never fail the forward for it
            logger.exception("sglang-memha pipeline: planning failed, sending whole requests: %s", e)
            plan = None
    if plan is None:
        return original(scheduler, batch, *args, **kwargs)
    plan.device = getattr(pool, "device", None)
    pool.memha_layer_listener = plan.layer_written
    try:
        return original(scheduler, batch, *args, **kwargs)
    finally:
        pool.memha_layer_listener = None
        pipe.close(plan)
