"""A decode on SGLang's own fp8 pool (``--kv-cache-dtype fp8_e4m3``, any SGLang attention backend)
fed by a memha ``fp8_e4m3_tensor`` prefill: the descriptor's per-layer scales, the handshake's
verdicts, the decode's description of its pool, and the decode's acceptance of a prefill whose
``--kv-cache-dtype`` differs (SGLang refuses it; the plugin accepts it when the bytes are the same).

In-process only: SGLang refuses an fp8 KV pool in a server on this CPU (no AMX), so no server test.
"""

import re
from types import SimpleNamespace

import pytest
import torch

from sglang_memha.kvformat import Bridge, FormatDescriptor, FormatMismatchError
from sglang_memha.sglang_ext import state
from sglang_memha.sglang_ext.pool import stock_pool as stock
from sglang_memha.sglang_ext.transfer import conn_handshake, handshake
from sglang_memha.sglang_ext.transfer.mooncake_conn import MemhaKVManager

L = 3
ONES = ((1.0, 1.0),) * L
CALIBRATED = ((1.0, 1.0), (0.5, 1.0), (1.0, 2.0))


def desc(fmt="fp8_e4m3_tensor", scales=ONES, page=16):
    return FormatDescriptor(fmt=fmt, page_size=page, num_kv_heads=2, head_dim=64, num_layers=L, model_id="m#1",
                            kv_scales=scales)


def test_kv_scales_round_trip_and_stay_out_of_other_descriptors():
    d = desc(scales=CALIBRATED)
    assert FormatDescriptor.from_bytes(d.to_bytes()) == d
    assert b'"kv_scales":[[1.0,1.0],[0.5,1.0],[1.0,2.0]]' in d.to_bytes()
    assert b"kv_scales" not in desc(fmt="fp8_e4m3", scales=None).to_bytes()


@pytest.mark.parametrize("scales, fmt, text", [
    (ONES, "fp8_e4m3", "kv_scales is stated for fmt=fp8_e4m3: expected it only for fp8_e4m3_tensor"),
    (ONES[:2], "fp8_e4m3_tensor", "kv_scales has 2 entries: expected one [k_scale, v_scale] pair per layer (3)"),
    (((1.0, 0.0),) * L, "fp8_e4m3_tensor", "kv_scales[0]=(1.0, 0.0): expected [k_scale, v_scale], two positive"),
    ([[1.0, float("nan")]] * L, "fp8_e4m3_tensor", "kv_scales[0]=[1.0, nan]"),
    ([[True, 1.0]] * L, "fp8_e4m3_tensor", "kv_scales[0]=[True, 1.0]"),
])
def test_bad_kv_scales_name_the_field(scales, fmt, text):
    with pytest.raises(ValueError, match=re.escape(text)):
        desc(fmt=fmt, scales=scales)


def test_equal_scales_pass_and_differing_ones_are_named():
    assert desc().check_compatible(desc()) == []
    with pytest.raises(FormatMismatchError, match=r"differ in 2 layer\(s\): layer 1: \(1.0, 1.0\) vs \(0.5, 1.0\), "
                                                  r"layer 2: \(1.0, 1.0\) vs \(1.0, 2.0\)"):
        desc().check_compatible(desc(scales=CALIBRATED))
    with pytest.raises(FormatMismatchError, match="a side that states none runs another sglang-memha"):
        desc().check_compatible(desc(scales=None))


def test_encoding_into_calibrated_fp8_tensor_pages_is_refused():
    bf16 = desc(fmt="bf16", scales=None)
    assert desc().check_compatible(bf16) == [Bridge.ENCODE_ON_SEND]  # scale 1.0: the codec's own
    with pytest.raises(FormatMismatchError, match="quantizes fp8_e4m3_tensor pages with scale 1.0 on send"):
        desc(scales=CALIBRATED).check_compatible(bf16)


def layout(d, secret=None):
    return handshake.encode_layout(d, secret)


def test_stock_decode_verdicts():
    local = desc(scales=CALIBRATED)
    check = lambda kv_layout, **kw: handshake.check_prefill_peer(local, kv_layout, "p:1", local_stock=True, **kw)  # noqa: E731
    assert check(None) is None  # plain SGLang prefill: served as without the plugin
    assert check(layout(desc(scales=CALIBRATED))) is None
    r = check(layout(desc()))
    assert r.kind == "format_mismatch" and "layer 1: (0.5, 1.0) vs (1.0, 1.0)" in r
    r = check(layout(desc(scales=CALIBRATED, page=32)))
    assert r.kind == "unsupported_bridge" and "takes pages only as they are" in r and "page_size=32" in r
    r = check(layout(desc(fmt="fp8_e4m3", scales=None)))  # would be re-quantized with scale 1.0
    assert r.kind == "format_mismatch" and "local='layer 1: (0.5, 1.0)' peer='1.0'" in r
    r = handshake.check_prefill_peer(desc(), layout(desc(fmt="fp8_e4m3", scales=None)), "p:1", local_stock=True)
    assert r.kind == "unsupported_bridge" and "sends fmt=fp8_e4m3 page_size=16" in r
    r = check(None, secret="s3")
    assert r.kind == "no_descriptor"  # a decode with a shared secret still wants a tagged prefill
    # the same layout judged by a memha (not stock) decode: a missing descriptor is refused
    assert handshake.check_prefill_peer(local, None, "p:1").kind == "no_descriptor"


class Attn(torch.nn.Module):
    def __init__(self, layer_id, k, v):
        super().__init__()
        self.layer_id, self.k_scale_float, self.v_scale_float = layer_id, k, v


def kvc(mode, model):
    hf = SimpleNamespace(architectures=["X"], num_hidden_layers=L)
    return SimpleNamespace(server_args=SimpleNamespace(disaggregation_mode=mode), model=model,
                           model_config=SimpleNamespace(hf_config=hf, model_path="/m/tiny"))


def pool(dtype):
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return MHATokenToKVPool(64, page_size=16, dtype=dtype, head_num=2, head_dim=64, layer_num=L, device="cpu",
                            enable_memory_saver=False)


def test_stock_fp8_decode_describes_its_pool_with_the_model_scales(monkeypatch):
    monkeypatch.delenv("MEMHA_KV_FORMAT", raising=False)
    monkeypatch.delenv("MEMHA_ENCODE_ON_SEND", raising=False)
    model = torch.nn.ModuleList([Attn(0, None, None), Attn(1, 0.5, None), Attn(2, None, 2.0)])
    saved = (state.local_descriptor(), state.local_pool(), state.local_is_stock())
    try:
        for mode in ("decode", "prefill"):
            state.set_local_descriptor(None)
            p = pool(torch.float8_e4m3fn)
            stock.describe_stock_pool(p, kvc(mode, model))
            d = state.local_descriptor()
            assert (d.fmt.value, d.kv_scales, state.local_is_stock(), state.local_pool()) == \
                ("fp8_e4m3_tensor", CALIBRATED, True, p)
        state.set_local_descriptor(None)
        stock.describe_stock_pool(pool(torch.bfloat16), kvc("decode", model))  # a bf16 decode: as before
        assert state.local_descriptor() is None
        stock.describe_stock_pool(pool(torch.float8_e4m3fn), kvc("decode", torch.nn.ModuleList([Attn(0, 1.0, 1.0)])))
        assert state.local_descriptor() is None  # layers 1, 2 unreadable: no scales, no check, plain SGLang
    finally:
        state.set_local_descriptor(saved[0], pool=saved[1], stock=saved[2])


DTYPE_REFUSAL = ("KV cache dtype mismatch: prefill server has kv_cache_dtype=auto, but decode server has "
                 "kv_cache_dtype=fp8_e4m3. Both servers must use the same --kv-cache-dtype value.")


def test_prefill_dtype_read_only_from_sglangs_dtype_refusal():
    assert conn_handshake._prefill_kv_dtype(DTYPE_REFUSAL) == "auto"
    assert conn_handshake._prefill_kv_dtype("Page size mismatch: prefill server has page_size=16, ...") is None


def decode_manager(monkeypatch, prefill_layout, local=desc(scales=CALIBRATED)):
    """A decode manager on SGLang's fp8 pool whose SGLang check is a stand-in with SGLang's dtype rule."""
    info = SimpleNamespace(kv_cache_dtype="auto", kv_layout=prefill_layout, attn_tp_size=1, page_size=16)

    def sglang_check(self, addr):
        if info.kv_cache_dtype != self.kv_cache_dtype_str:
            raise RuntimeError(DTYPE_REFUSAL)
        self.prefill_info_table[addr] = info
        return True

    monkeypatch.setattr(MemhaKVManager.memha_sglang_cls, "try_ensure_parallel_info", sglang_check)
    mgr = object.__new__(MemhaKVManager)
    mgr.__dict__.update(memha_desc=local, memha_stock=True, memha_secret=None, memha_refused_prefills={},
                        prefill_info_table={}, kv_cache_dtype_str="fp8_e4m3", attn_tp_size=1)
    return mgr, info


def test_memha_fp8_tensor_prefill_accepted_by_a_stock_fp8_decode(monkeypatch):
    mgr, info = decode_manager(monkeypatch, layout(desc(scales=CALIBRATED)))
    assert mgr.try_ensure_parallel_info("p:1") is True
    assert mgr.prefill_info_table == {"p:1": info} and mgr.memha_refused_prefills == {}


@pytest.mark.parametrize("prefill_layout, text", [
    (None, "only an sglang-memha prefill with MEMHA_KV_FORMAT=fp8_e4m3_tensor writes its bytes"),
    (layout(desc()), "layer 1: (0.5, 1.0) vs (1.0, 1.0)"),
    (layout(desc(fmt="bf16", scales=None)), "quantizes fp8_e4m3_tensor pages with scale 1.0 on send"),
])
def test_other_prefills_refused_with_the_reason(monkeypatch, prefill_layout, text):
    mgr, _ = decode_manager(monkeypatch, prefill_layout)
    assert mgr.try_ensure_parallel_info("p:1") is False
    assert mgr.prefill_info_table == {}
    assert text in mgr.memha_refused_prefills["p:1"]


def test_a_memha_decode_still_refuses_the_dtype_mismatch(monkeypatch):
    mgr, _ = decode_manager(monkeypatch, layout(desc(scales=CALIBRATED)), local=desc(fmt="fp8_e4m3", scales=None))
    mgr.memha_stock = False
    assert mgr.try_ensure_parallel_info("p:1") is False
    assert mgr.memha_refused_prefills["p:1"].endswith(DTYPE_REFUSAL)
