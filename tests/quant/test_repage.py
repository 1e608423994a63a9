"""``Bridge.REPAGE`` addressing (``sglang_ext.transfer.repage``): which prefill rows go to which decode
slots, as Mooncake blocks, worked out by hand for each case below (no servers)."""
import numpy as np
import pytest

from sglang_memha.kvformat import FormatDescriptor
from sglang_memha.sglang_ext.transfer import repage


def run_list(tokens, staged=False):
    src = tokens.staged_rows if staged else tokens.src_slots
    return [tuple(int(x) for x in r) for r in repage.runs(src, tokens.dst_slots)]


def test_prefill_16_to_decode_32_chunk_boundary_inside_a_decode_page():
    """100 tokens, decode pages [5, 2, 9, 10] of 32; the prefill sends pages of 16 in two chunks,
    the first ending at token 48 (the middle of decode page 2)."""
    virtual = repage.virtual_positions(4, 16, 32)
    assert virtual.tolist() == list(range(8)) and virtual.dtype == np.int32
    dst = [5, 2, 9, 10]
    a = repage.token_map([10, 11, 12], virtual[0:3], dst, 16, 32, n_tokens=48)
    # t 0..31: slots 160..191 -> decode page 5 (160..191); t 32..47: slots 192.. -> page 2 (64..)
    assert run_list(a) == [(160, 160, 32), (192, 64, 16)]
    assert run_list(a, staged=True) == [(0, 160, 32), (32, 64, 16)]
    b = repage.token_map([20, 21, 40, 41], virtual[3:7], dst, 16, 32, n_tokens=52)
    # t 48..63 -> page 2 offsets 16..31; t 64..79 -> page 9 (288..); t 80..99 -> 304..323, where
    # prefill pages 40, 41 and decode pages 9, 10 are both consecutive: one run
    assert run_list(b) == [(320, 80, 16), (336, 288, 16), (640, 304, 20)]
    assert len(b.dst_slots) == 52  # page 41's 12 unwritten rows are not sent


def test_prefill_32_to_decode_16_last_page_partial():
    dst = [7, 3, 4]  # 40 tokens in decode pages of 16
    full = repage.token_map([2, 5], [0, 1], dst, 32, 16, n_tokens=40)
    assert run_list(full) == [(64, 112, 16), (80, 48, 16), (160, 64, 8)]
    # without a token count: every token the decode's pages cover (48), none past them
    pages_only = repage.token_map([2, 5], [0, 1], dst, 32, 16)
    assert run_list(pages_only) == [(64, 112, 16), (80, 48, 16), (160, 64, 16)]


def test_non_multiple_page_sizes_16_to_24():
    tokens = repage.token_map([3, 4, 5], [0, 1, 2], [1, 0], 16, 24, n_tokens=48)
    assert run_list(tokens) == [(48, 24, 24), (72, 0, 24)]
    assert repage.virtual_positions(2, 16, 24).tolist() == [0, 1, 2]
    assert repage.virtual_positions(3, 24, 16).tolist() == [0, 1]


def test_equal_page_sizes_give_page_runs():
    tokens = repage.token_map([1, 2, 3, 7], [0, 1, 2, 3], [4, 5, 11, 12], 16, 16)
    assert run_list(tokens, staged=True) == [(0, 64, 32), (32, 176, 32)]


def test_blocks_are_byte_addresses_per_run():
    runs = np.array([[160, 160, 32], [192, 64, 16]])
    assert repage.blocks(runs, 1000, 50000, 136, 136) == [
        (1000 + 160 * 136, 50000 + 160 * 136, 32 * 136), (1000 + 192 * 136, 50000 + 64 * 136, 16 * 136)]
    with pytest.raises(ValueError, match="prefill rows are 136 B, decode rows 128 B"):
        repage.blocks(runs, 0, 0, 136, 128)
    assert repage.runs(np.array([]), np.array([])).shape == (0, 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2 prefill pages but 1 page positions"):
        repage.token_map([1, 2], [0], [3], 16, 32)
    with pytest.raises(ValueError, match="chunk token 47 is past the decode's 1 pages of 32 tokens"):
        repage.token_map([1, 2, 3], [0, 1, 2], [3], 16, 32, n_tokens=48)


def test_sessions_table():
    repage.register_session("10.0.0.1:1234", 16, 32)
    assert repage.session_page_sizes("10.0.0.1:1234") == (16, 32)
    repage.forget_session("10.0.0.1:1234")
    assert repage.session_page_sizes("10.0.0.1:1234") is None


def test_prefill_page_size_read_only_from_sglangs_page_size_refusal():
    msg = ("Page size mismatch: prefill server has page_size=16, but decode server has page_size=32. "
           "Both servers must use the same --page-size value.")
    assert repage.prefill_page_size(msg) == 16
    assert repage.prefill_page_size("KV cache dtype mismatch: prefill server has page_size=16") is None


def test_probe_sees_the_prefill_page_size_and_publishes_nothing():
    class KVArgs:
        page_size = 32

    class Mgr:
        kv_args, prefill_info_table, attn_tp_size = KVArgs(), {}, 1

    mgr = Mgr()
    probe = repage.PageSizeProbe(mgr, 16)
    assert probe.kv_args.page_size == 16 and mgr.kv_args.page_size == 32
    assert probe.attn_tp_size == 1  # everything else is the manager's
    probe.prefill_info_table["p:1"] = "info"
    assert mgr.prefill_info_table == {}


def desc(page):
    return FormatDescriptor(fmt="fp8_e4m3", page_size=page, num_kv_heads=2, head_dim=64, num_layers=2,
                            model_id="m#1")


def test_acceptance():
    assert repage.acceptance_problem(32, 16, desc(16), False, [], "p:1") is None
    assert repage.acceptance_problem(24, 16, desc(16), False, [], "p:1") is None
    assert repage.acceptance_problem(32, 16, desc(16), True, [], "p:1") is None  # 32 % 16 == 0
    for args, text in [((32, 16, None, False, []), "only an sglang-memha prefill"),
                       ((32, 16, desc(64), False, []), "describes page_size=64 but registered 16"),
                       ((32, 16, desc(16), False, ["swa"]), "state components ['swa']"),
                       ((24, 16, desc(16), True, []), "--disaggregation-decode-enable-radix-cache")]:
        problem = repage.acceptance_problem(*args, "p:1")
        assert problem is not None and text in problem, problem
        if "describes" not in text:
            assert "prefill page_size=16, decode page_size=" in problem


def test_transfer_info_keeps_decode_pages_and_gets_positions():
    mc = pytest.importorskip("sglang.srt.disaggregation.mooncake.conn")
    from sglang_memha.sglang_ext.transfer.conn_bridges import virtualize_repaged_destination

    def parse(cls, msg):
        return cls(room=1, endpoint="e", dst_port=1, mooncake_session_id=msg[0], dst_kv_indices=msg[1],
                   dst_aux_index=0, dst_state_indices=[], required_dst_info_num=1, is_dummy=False)

    pages = np.array([5, 2, 9, 10], dtype=np.int32)
    repage.register_session("s-repaged", 16, 32)
    try:
        info = virtualize_repaged_destination(parse, mc.TransferInfo, ["s-repaged", pages])
        plain = virtualize_repaged_destination(parse, mc.TransferInfo, ["s-other", pages])
    finally:
        repage.forget_session("s-repaged")
    assert info.memha_decode_pages.tolist() == [5, 2, 9, 10]
    assert info.dst_kv_indices.tolist() == list(range(8))
    assert plain.dst_kv_indices is pages and not hasattr(plain, "memha_decode_pages")


def test_runs_group_like_sglangs_contiguous_grouping():
    """Same grouping as SGLang's ``group_concurrent_contiguous`` (which the page-level paths
    use; ``runs`` is its vectorised form for token rows, without per-member lists)."""
    utils = pytest.importorskip("sglang.srt.disaggregation.common.utils")
    rng = np.random.default_rng(0)
    for _ in range(20):
        src = np.cumsum(rng.integers(1, 3, size=60))
        dst = np.cumsum(rng.choice([1, 1, 1, 5], size=60))
        src_groups, dst_groups = utils.group_concurrent_contiguous(src, dst)
        want = [(s[0], d[0], len(s)) for s, d in zip(src_groups, dst_groups)]
        assert [tuple(int(x) for x in r) for r in repage.runs(src, dst)] == want
