"""Different attention TP on prefill and decode (``sglang_ext/transfer/head_slice.py``), on real
pools of the tiny model's geometry (2 KV heads, head_dim 64, 2 layers, pages of 32) with a K offset,
in-process: no servers, Mooncake replaced by a memmove of each block.

* every format codes each (token, head) row from that head alone, K offset and Hadamard included
  (a TP-1 pool's head h holds exactly TP-2 rank h's rows), which is what makes slicing valid;
* prefill TP 2 -> decode TP 1 (merge) and TP 1 -> TP 2 (split) through
  ``MemhaKVManager.send_kvcache_slice``, whose head mapping is SGLang's ``compute_head_slice_params``:
  the decode's pages hold the bytes a pool of its TP size would have written, byte for byte, and
  the transfer line counts exactly the heads' rows sent;
* SGLang's own ``send_kvcache_slice`` gives the same blocks where a format has no scale rows, and
  data-sized blocks for the scale buffers where it has them (why ours exists);
* the registration refusals, by their text.
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch

mc = pytest.importorskip("sglang.srt.disaggregation.mooncake.conn")

from sglang_memha.kvformat import KVFormat, k_offset, kv_bytes_per_token  # noqa: E402
from sglang_memha.kvformat.layout import PoolLayout  # noqa: E402
from sglang_memha.sglang_ext.pool import quant_pool  # noqa: E402
from sglang_memha.sglang_ext.transfer import head_slice  # noqa: E402
from sglang_memha.sglang_ext.transfer.mooncake_conn import MemhaKVManager  # noqa: E402
from sglang_memha.testing.transfer_log import transfer_rows  # noqa: E402

H, D, L, PAGE = 2, 64, 2, 32  # tiny_qwen3 geometry; pages of 32 hold whole int4_kivi K blocks
SRC_PAGES, DST_PAGES = np.array([1, 2, 5]), np.array([6, 3, 4])
FORMATS = [f.value for f in KVFormat]
BLOCK_CODED = ("int4_kivi", "int4_kivi_g64")  # K coded per 32-token block
MODEL = "test#0"


class _Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


@pytest.fixture(scope="module")
def offset_path(tmp_path_factory):
    """A K offset with large per-head channels, different per head (a wrong head's offset shows)."""
    c = torch.randn(L, H, D, generator=torch.Generator().manual_seed(3)) * 0.5
    c[:, 0, 30:32] += 40.0
    c[:, 1, 10:12] -= 25.0
    path = str(tmp_path_factory.mktemp("koff") / "k_offset.safetensors")
    k_offset.save(path, c.bfloat16().float(), MODEL, {"source": "test"})
    return path


def make_pool(fmt, heads, tp_rank, tp_size, offset, monkeypatch):
    """A pool of ``heads`` KV heads as attention-TP rank ``tp_rank`` of ``tp_size`` builds it (its
    K offset rows: ``k_offset.for_rank``)."""
    k_transform = "hadamard" if fmt not in ("bf16", "fp8_e4m3_tensor") else "none"
    monkeypatch.setattr(quant_pool, "_attention_tp", lambda: (tp_rank, tp_size))
    cls = quant_pool.MemhaQuantKVPool.configured(fmt, k_transform, MODEL, offset)
    return cls(8 * PAGE, page_size=PAGE, dtype=torch.bfloat16, head_num=heads, head_dim=D, layer_num=L,
               device="cpu", enable_memory_saver=False)


def write(pool, heads: slice, seed=5):
    """The same model-space K/V (all H heads; ``heads`` of them go to this pool) into SRC_PAGES."""
    g = torch.Generator().manual_seed(seed)
    loc = torch.as_tensor((SRC_PAGES[:, None] * PAGE + np.arange(PAGE)).reshape(-1))
    for layer in range(L):
        k = (torch.randn(len(loc), H, D, generator=g) * 3).bfloat16()
        v = torch.randn(len(loc), H, D, generator=g).bfloat16()
        k[::5, :, 7] = 60.0  # an outlier channel
        pool.set_kv_buffer(_Layer(layer), loc, k[:, heads].contiguous(), v[:, heads].contiguous())


def buffers(pool) -> list[torch.Tensor]:
    """Published buffers in entry order, as [slots, heads, row bytes] uint8."""
    ptrs, _, _ = pool.get_contiguous_buf_infos()
    return [t.view(torch.uint8).view(t.shape[0], pool.head_num, -1) for t in pool._pd_registerable_tensors()
            if t.data_ptr() in ptrs]


def slots(pages) -> torch.Tensor:
    return torch.as_tensor((np.asarray(pages)[:, None] * PAGE + np.arange(PAGE)).reshape(-1))


def prefill_manager(pool, tp_rank, tp_size):
    mgr = object.__new__(MemhaKVManager)
    mgr._init_room_stats()
    mgr.memha_desc, mgr.memha_stock, mgr.memha_sliced, mgr.request_status = pool.memha_descriptor, False, {}, {}
    ptrs, _, item_lens = pool.get_contiguous_buf_infos()
    mgr.kv_args = SimpleNamespace(kv_data_ptrs=ptrs, kv_item_lens=item_lens, engine_rank=tp_rank,
                                  kv_head_num=pool.head_num, total_kv_head_num=H, page_size=PAGE, state_types=[],
                                  kv_layer_ids=[], prefill_start_layer=0)
    mgr.attn_tp_size, mgr.pp_size, mgr.enable_staging = tp_size, 1, False
    return mgr


def registration(pool, tp_rank, tp_size, session):
    ptrs, _, item_lens = pool.get_contiguous_buf_infos()
    return SimpleNamespace(mooncake_session_id=session, dst_tp_rank=tp_rank, dst_attn_tp_size=tp_size,
                           dst_kv_ptrs=ptrs, dst_kv_item_lens=item_lens, dst_dcp_size=1,
                           requires_dcp_relayout=False)


def send(mgr, dst_pool, dst_rank, dst_tp, room):
    """The registration check, then one chunk through ``send_kvcache_slice``; the room's line."""
    reg = registration(dst_pool, dst_rank, dst_tp, f"d{dst_rank}")
    assert mgr._head_slice_problem(reg, dst_pool.memha_descriptor) is None
    mgr._memha_tls.room = room
    assert mgr.send_kvcache_slice(reg.mooncake_session_id, SRC_PAGES, reg.dst_kv_ptrs, DST_PAGES, dst_rank,
                                  dst_tp, reg.dst_kv_item_lens[0], None) == 0


@pytest.fixture
def memmove(monkeypatch):
    """Mooncake as a memmove of each block (SGLang's ``_transfer_data``, below our accounting)."""
    def transfer(self, session, blocks):
        for src, dst, n in blocks:
            ctypes.memmove(dst, src, n)
        return 0
    monkeypatch.setattr(mc.MooncakeKVManager, "_transfer_data", transfer)


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_head_is_coded_alone_so_tp_ranks_hold_its_rows(fmt, offset_path, monkeypatch):
    one = make_pool(fmt, H, 0, 1, offset_path, monkeypatch)
    write(one, slice(0, H))
    s = slots(SRC_PAGES)
    for r in range(2):
        rank = make_pool(fmt, 1, r, 2, offset_path, monkeypatch)
        write(rank, slice(r, r + 1))
        assert all(torch.equal(a[s, r:r + 1], b[s]) for a, b in zip(buffers(one), buffers(rank))), (fmt, r)


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_tp2_merged_into_decode_tp1_byte_exact(fmt, offset_path, monkeypatch, memmove, caplog):
    want = make_pool(fmt, H, 0, 1, offset_path, monkeypatch)
    write(want, slice(0, H))
    decode = make_pool(fmt, H, 0, 1, offset_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="sglang_memha"):
        for r in range(2):
            rank = make_pool(fmt, 1, r, 2, offset_path, monkeypatch)
            write(rank, slice(r, r + 1))
            mgr = prefill_manager(rank, r, 2)
            send(mgr, decode, 0, 1, room=10 + r)
            mgr._log_room(10 + r, "ok")
    src, dst = slots(SRC_PAGES), slots(DST_PAGES)
    if fmt not in BLOCK_CODED:  # model-space K: each head's rows hold K minus that head's offset
        assert torch.equal(decode.get_key_buffer(1)[dst], want.get_key_buffer(1)[src]), fmt
    for a, b in zip(buffers(want), buffers(decode)):
        assert torch.equal(b[dst], a[src]), fmt
        b[dst] = 0
        assert not b.any(), fmt  # nothing written outside the destination pages
    rows = transfer_rows(caplog.text)
    one_head = len(SRC_PAGES) * PAGE * L * kv_bytes_per_token(fmt, 1, D)
    assert [(r.room, r.pages, r.kv_bytes, r.fmt) for r in rows] == [(10, 3, one_head, fmt), (11, 3, one_head, fmt)]


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_tp1_split_over_decode_tp2_byte_exact(fmt, offset_path, monkeypatch, memmove, caplog):
    prefill = make_pool(fmt, H, 0, 1, offset_path, monkeypatch)
    write(prefill, slice(0, H))
    mgr = prefill_manager(prefill, 0, 1)
    src, dst = slots(SRC_PAGES), slots(DST_PAGES)
    decodes = [make_pool(fmt, 1, r, 2, offset_path, monkeypatch) for r in range(2)]
    with caplog.at_level(logging.WARNING, logger="sglang_memha"):
        for r, decode in enumerate(decodes):
            send(mgr, decode, r, 2, room=20)
        mgr._log_room(20, "ok")
    for r, decode in enumerate(decodes):
        want = make_pool(fmt, 1, r, 2, offset_path, monkeypatch)
        write(want, slice(r, r + 1))
        if fmt not in BLOCK_CODED:  # model-space K read back: the decode rank adds its own heads' offset
            assert torch.equal(decode.get_key_buffer(1)[dst], want.get_key_buffer(1)[src]), (fmt, r)
        for a, b in zip(buffers(want), buffers(decode)):
            assert torch.equal(b[dst], a[src]), (fmt, r)
            b[dst] = 0
            assert not b.any(), (fmt, r)
    (row,) = transfer_rows(caplog.text)  # both decode sessions' chunks, one room
    assert (row.pages, row.kv_bytes) == (6, len(SRC_PAGES) * PAGE * L * kv_bytes_per_token(fmt, H, D))


def _sglang_blocks(mgr, dst_pool, dst_rank, dst_tp) -> list[list[tuple]]:
    """The blocks SGLang's own ``MooncakeKVManager.send_kvcache_slice`` asks Mooncake for, one
    list per call; it makes one call per entry, in entry order (one worker keeps that order)."""
    calls = []
    mgr.engine = SimpleNamespace(batch_transfer_sync=lambda s, src, dst, lens: calls.append(
        list(zip(src, dst, lens))) or 0)
    mgr.enable_deferred_decode_kv_release = False
    ptrs, _, item_lens = dst_pool.get_contiguous_buf_infos()
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        assert mc.MooncakeKVManager.send_kvcache_slice(mgr, "d", SRC_PAGES, ptrs, DST_PAGES, dst_rank, dst_tp,
                                                       item_lens[0], ex) == 0
    return calls


def _our_blocks(mgr, dst_pool, dst_rank, dst_tp, monkeypatch) -> list[list[tuple]]:
    """Ours, in Mooncake calls of at most MAX_BLOCKS_PER_CALL blocks (all full but the last), split
    per entry (each entry's blocks are one per token, in order)."""
    calls = []
    monkeypatch.setattr(mc.MooncakeKVManager, "_transfer_data", lambda self, s, blocks: calls.append(blocks) or 0)
    send(mgr, dst_pool, dst_rank, dst_tp, room=30)
    n = len(SRC_PAGES) * PAGE
    blocks = [b for call in calls for b in call]
    assert [len(c) for c in calls[:-1]] == [head_slice.MAX_BLOCKS_PER_CALL] * (len(calls) - 1)
    assert 0 < len(calls[-1]) <= head_slice.MAX_BLOCKS_PER_CALL and len(calls) > 1  # 3 pages x 32 x entries
    return [blocks[i:i + n] for i in range(0, len(blocks), n)]


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3_tensor", "fp8_e4m3", "int4_g32"])
@pytest.mark.parametrize("src_tp, dst_tp, src_rank, dst_rank", [(2, 1, 1, 0), (1, 2, 0, 1)])
def test_sglangs_own_slicing_is_ours_without_scale_rows_and_data_sized_on_scale_rows(
        fmt, src_tp, dst_tp, src_rank, dst_rank, offset_path, monkeypatch):
    src = make_pool(fmt, H // src_tp, src_rank, src_tp, offset_path, monkeypatch)
    dst = make_pool(fmt, H // dst_tp, dst_rank, dst_tp, offset_path, monkeypatch)
    mgr = prefill_manager(src, src_rank, src_tp)
    theirs, ours = _sglang_blocks(mgr, dst, dst_rank, dst_tp), _our_blocks(mgr, dst, dst_rank, dst_tp, monkeypatch)
    layout = PoolLayout.of(src.memha_descriptor)
    assert len(theirs) == len(ours) == len(layout.entries)
    for e, t, o, ptr, size in zip(layout.entries, theirs, ours, mgr.kv_args.kv_data_ptrs,
                                  src.get_contiguous_buf_infos()[1]):
        if e.kind == "data":  # SGLang's head mapping, and its bytes where the row is the data row
            assert t == o, (fmt, e)
            continue
        # a scale buffer: SGLang sizes the blocks and their offsets by the data row, reading
        # past the end of the buffer; ours take the scale row
        assert {n for _, _, n in o} == {layout.row.scale_bytes}
        assert {n for _, _, n in t} == {layout.row.data_bytes}
        assert max(a + n for a, _, n in t) > ptr + size >= max(a + n for a, _, n in o)


def test_registration_refusals_name_the_setting(offset_path, monkeypatch):
    src = make_pool("fp8_e4m3", 1, 0, 2, offset_path, monkeypatch)
    dst = make_pool("fp8_e4m3", H, 0, 1, offset_path, monkeypatch)
    mgr = prefill_manager(src, 0, 2)
    reg = registration(dst, 0, 1, "d0")
    pre = "attention TP prefill=2 decode=1: "
    mgr.enable_staging = True
    assert mgr._head_slice_problem(reg, dst.memha_descriptor) == pre + (
        "SGLANG_DISAGG_STAGING_BUFFER is set; its staging path copies bf16 rows of one size, not "
        "sglang-memha's data and scale rows: unset it, or use the same --tp-size on both servers")
    mgr.enable_staging, mgr.pp_size = False, 2
    assert mgr._head_slice_problem(reg, dst.memha_descriptor) == pre + (
        "head slicing supports one pipeline stage (pp_size=2); use the same --tp-size on both servers")
    mgr.pp_size = 1
    reg.dst_kv_item_lens = reg.dst_kv_item_lens[:-1] + [7]
    assert mgr._head_slice_problem(reg, dst.memha_descriptor) == pre + (
        "decode registered 8 KV buffers of [7, 128, 4096] B per page, a fp8_e4m3 pool of 2 kv heads has 8 "
        "of [128, 4096]; use the same --tp-size on both servers")
    assert mgr.memha_sliced == {}
    reg = registration(dst, 0, 1, "d0")
    assert mgr._head_slice_problem(reg, dst.memha_descriptor) is None and mgr.memha_sliced["d0"].heads == H


def test_pool_takes_its_heads_offset_rows_from_sglangs_parallel_context(offset_path):
    """Inside a scheduler the rank comes from SGLang's ``get_parallel()`` (no monkeypatch here):
    a 1-head pool of attention-TP rank r of 2 subtracts head r's offset rows; nothing published
    (a pool outside a scheduler) is rank 0 of 1."""
    from sglang.srt.runtime_context import get_parallel

    full = k_offset.load(offset_path).values
    for r in range(2):
        with get_parallel().override(attn_tp_rank=r, attn_tp_size=2):
            cls = quant_pool.MemhaQuantKVPool.configured("fp8_e4m3", "hadamard", MODEL, offset_path)
            pool = cls(2 * PAGE, page_size=PAGE, dtype=torch.bfloat16, head_num=1, head_dim=D, layer_num=L,
                       device="cpu", enable_memory_saver=False)
        assert torch.equal(pool.k_offset, full[:, r:r + 1]), r
    assert quant_pool._attention_tp() == (0, 1)


def test_a_failed_call_stops_the_send_with_its_status(offset_path, monkeypatch):
    """The blocks go in several calls; the first non-zero status is returned and no later call is
    made (the room fails with it)."""
    src = make_pool("fp8_e4m3", 1, 0, 2, offset_path, monkeypatch)
    dst = make_pool("fp8_e4m3", H, 0, 1, offset_path, monkeypatch)
    mgr = prefill_manager(src, 0, 2)
    reg = registration(dst, 0, 1, "d0")
    assert mgr._head_slice_problem(reg, dst.memha_descriptor) is None
    statuses, calls = iter([0, -7, 0]), []
    monkeypatch.setattr(mc.MooncakeKVManager, "_transfer_data",
                        lambda self, s, blocks: calls.append(len(blocks)) or next(statuses))
    mgr._memha_tls.room = 40
    assert mgr.send_kvcache_slice("d0", SRC_PAGES, reg.dst_kv_ptrs, DST_PAGES, 0, 1, reg.dst_kv_item_lens[0],
                                  None) == -7
    assert calls == [head_slice.MAX_BLOCKS_PER_CALL] * 2
