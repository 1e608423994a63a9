"""Handshake verdicts (pure functions): every case returns None or a message naming both sides."""
import pytest

from sglang_memha.kvformat import FORMAT_VERSION, FormatDescriptor, KVFormat
from sglang_memha.sglang_ext import handshake as hs


def desc(**kw):
    base = dict(fmt="fp8_e4m3", page_size=16, num_kv_heads=2, head_dim=64, num_layers=2, model_id="m#1")
    return FormatDescriptor(**{**base, **kw})


def test_layout_and_frame_round_trip():
    d = desc()
    assert hs.check_prefill_peer(d, hs.encode_layout(d), "p:1") is None
    msg = [b"x"] * 20 + [hs.encode_frame(d)]
    assert hs.find_frame(msg) == hs.encode_frame(d)
    assert hs.check_decode_peer(d, hs.find_frame(msg), "d:1") is None


def test_frame_only_after_stock_frames():
    # A stock registration message has 20 frames; a MEMHA1-looking frame inside them is data.
    msg = [hs.encode_frame(desc())] + [b""] * 19
    assert hs.find_frame(msg) is None


@pytest.mark.parametrize("field,value", [("fmt", "int8"), ("num_layers", 3), ("head_dim", 128),
                                         ("num_kv_heads", 4), ("model_id", "other#2"),
                                         ("k_transform", "hadamard")])
def test_mismatch_names_field_and_both_values(field, value):
    local, peer = desc(), desc(**{field: value})
    for reason in (hs.check_prefill_peer(local, hs.encode_layout(peer), "10.0.0.1:8998"),
                   hs.check_decode_peer(peer, hs.encode_frame(local), "10.0.0.2:4000")):
        assert reason is not None and field in reason
        assert repr(getattr(local, field) if field != "fmt" else local.fmt.value) in reason
        assert repr(value) in reason


def test_missing_descriptor_names_the_fix():
    r = hs.check_prefill_peer(desc(), None, "10.0.0.1:8998")
    assert "10.0.0.1:8998" in r and "MEMHA_KV_FORMAT" in r and "fp8_e4m3" in r
    assert hs.check_prefill_peer(desc(), "dsv4-layout-x", "p") is not None  # someone else's layout
    r = hs.check_decode_peer(desc(), None, "10.0.0.2:4000")
    assert "decode at 10.0.0.2:4000" in r and "MEMHA_KV_FORMAT" in r


def test_version_mismatch_refused():
    old = desc(version=FORMAT_VERSION + 1)
    r = hs.check_prefill_peer(desc(), hs.encode_layout(old), "p")
    assert r is not None and "version" in r


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'{"fmt": "nope"}', b'{"bogus": 1}', b"\xff\xfe"])
def test_malformed_descriptor_is_a_message_not_a_crash(raw):
    assert "malformed" in hs.check_decode_peer(desc(), hs.FRAME_PREFIX + raw, "d")
    layout = hs.LAYOUT_PREFIX + raw.decode(errors="replace")
    assert "malformed" in hs.check_prefill_peer(desc(), layout, "p")


def test_fnuz_fn_bridge_accepted_other_bridges_refused():
    # fnuz <-> fn keeps the row size: the decode converts the arrived rows in place.
    fn, fnuz = desc(fmt=KVFormat.FP8_E4M3), desc(fmt="fp8_e4m3fnuz")
    assert hs.check_prefill_peer(fn, hs.encode_layout(fnuz), "p") is None
    assert hs.bridges_for(fn, hs.encode_layout(fnuz)) == [hs.Bridge.FNUZ_TO_FN]
    assert hs.check_decode_peer(fnuz, hs.encode_frame(fn), "d") is None  # prefill's view of it
    # Different row sizes (per-layer -> per-token scale) or page sizes cannot land in place.
    r = hs.check_prefill_peer(fn, hs.encode_layout(desc(fmt="fp8_e4m3_tensor")), "p")
    assert r is not None and "layer_to_token_scale" in r
    r = hs.check_prefill_peer(desc(page_size=16), hs.encode_layout(desc(page_size=32)), "p")
    assert r is not None and "repage" in r
