"""Handshake verdicts (pure functions): every case returns None or a message naming both sides."""
import pytest

from sglang_memha.kvformat import FORMAT_VERSION, FormatDescriptor, KVFormat
from sglang_memha.sglang_ext.transfer import handshake as hs


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


@pytest.mark.parametrize("field,value", [("fmt", "int4_kivi"), ("fmt", "int4_kivi_g64"), ("num_layers", 3),
                                         ("head_dim", 128),
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



def test_page_sizes_re_paged_by_the_prefill():
    """Another page size is a sender bridge: both sides accept, the decode applies nothing, the
    prefill gets the decode's descriptor as its target (it re-pages what it sends)."""
    d16, p32 = desc(page_size=16), desc(page_size=32)
    assert hs.check_prefill_peer(d16, hs.encode_layout(p32), "p") is None
    assert hs.bridges_for(d16, hs.encode_layout(p32)) == []
    assert hs.check_decode_peer(p32, hs.encode_frame(d16), "d") is None
    assert hs.send_target(p32, hs.encode_frame(d16)) == d16
    assert hs.send_target(p32, hs.encode_frame(desc(page_size=32))) is None
    assert hs.layout_descriptor(hs.encode_layout(p32)) == p32
    assert hs.layout_descriptor(None) is None and hs.layout_descriptor("other") is None
    # with a format that cannot be bridged, the refusal names the formats and both page sizes
    r = hs.check_prefill_peer(desc(page_size=16, fmt="int4_kivi"), hs.encode_layout(desc(page_size=24)), "p")
    assert r is not None and "KV format mismatch" in r and "fmt: local='int4_kivi' peer='fp8_e4m3'" in r
    assert "page_size: decode=16 prefill=24" in r


def test_other_attention_tp_accepted_both_ways_with_head_products_equal():
    """Prefill TP 2 (1 head per rank) -> decode TP 1 (2 heads), and the reverse: both sides accept
    with the TP sizes given ((decode, prefill)), no send target (the rows are sliced by head, not
    converted); without them the per-rank heads differ; with a page size too, refused."""
    one, two = desc(num_kv_heads=1), desc(num_kv_heads=2)
    for dec, pre, tp in ((two, one, (1, 2)), (one, two, (2, 1))):
        assert hs.check_prefill_peer(dec, hs.encode_layout(pre), "p", tp=tp) is None
        assert hs.bridges_for(dec, hs.encode_layout(pre), tp) == []
        assert hs.check_decode_peer(pre, hs.encode_frame(dec), "d", tp=tp) is None
        assert hs.send_target(pre, hs.encode_frame(dec), tp) is None
        assert hs.frame_descriptor(hs.encode_frame(dec)) == dec
        assert "num_kv_heads: local=" in hs.check_prefill_peer(dec, hs.encode_layout(pre), "p")
    r = hs.check_decode_peer(desc(num_kv_heads=1, page_size=32), hs.encode_frame(two), "d:1", tp=(1, 2))
    assert r == ("decode at d:1 is incompatible: KV format mismatch with peer (not bridgeable): attention TP "
                 "(head slicing is not combined with the send-time bridge(s) ['repage']: use the same format "
                 "and page size on both servers, or the same --tp-size): local=1 peer=2 (local = decode, peer = "
                 "prefill); page_size: decode=16 prefill=32 (re-paging alone would be bridged)")
    assert r.kind == "format_mismatch"


@pytest.mark.parametrize("prefill_fmt, decode_fmt", [
    ("bf16", "fp8_e4m3"), ("bf16", "int4_g64"), ("bf16", "fp8_e4m3_tensor"), ("fp8_e4m3_tensor", "fp8_e4m3"),
    ("fp8_e4m3fnuz", "int8"), ("fp8_e4m3fnuz", "int4_g64"), ("int8", "fp8_e4m3")])
def test_sender_side_bridges_accepted_by_both_sides(prefill_fmt, decode_fmt):
    """A bf16 prefill (SGLang's pool or ours) quantizes on send; SGLang's per-layer fp8 bytes get
    per-row scales on send; another quantized format is dequantized and re-quantized on send: the
    decode accepts with nothing to apply, the prefill sees a target."""
    p, d = desc(fmt=prefill_fmt), desc(fmt=decode_fmt)
    assert hs.check_prefill_peer(d, hs.encode_layout(p), "p") is None
    assert hs.bridges_for(d, hs.encode_layout(p)) == []
    assert hs.check_decode_peer(p, hs.encode_frame(d), "d") is None
    assert hs.send_target(p, hs.encode_frame(d)) == d
    assert hs.send_target(d, hs.encode_frame(d)) is None  # same format: rows go as they are


@pytest.mark.parametrize("coded,other", [("int4_kivi", "int8"), ("int4_kivi_g64", "int8"),
                                         ("int4_kivi_g64", "int4_kivi")])
def test_unconvertible_formats_refused_by_both_sides_naming_both_formats(coded, other):
    """int4_kivi(_g64)'s K blocks are not rows: no conversion into or out of them (nor between the
    two: same K, other V rows)."""
    kivi, peer = desc(fmt=coded, page_size=32), desc(fmt=other, page_size=32)
    r = hs.check_prefill_peer(kivi, hs.encode_layout(peer), "10.0.0.1:8998")
    assert r == ("prefill at 10.0.0.1:8998 is incompatible: KV format mismatch with peer (not bridgeable): "
                 f"fmt: local='{coded}' peer='{other}' (local = decode, peer = prefill)")
    r = hs.check_decode_peer(kivi, hs.encode_frame(peer), "10.0.0.2:4000")
    assert r == ("decode at 10.0.0.2:4000 is incompatible: KV format mismatch with peer (not bridgeable): "
                 f"fmt: local='{other}' peer='{coded}' (local = decode, peer = prefill)")
    same = desc(fmt=coded, page_size=32)
    assert hs.check_prefill_peer(kivi, hs.encode_layout(same), "p") is None
    assert hs.check_decode_peer(same, hs.encode_frame(kivi), "d") is None


# ---- shared secret -----------------------------------------------------------------------------

def _registration(d, secret=None, session=b"10.0.0.2:15000"):
    msg = [b"None", b"10.0.0.2", b"4000", session, b"\x00" * 16] + [b""] * 15 + [hs.encode_frame(d)]
    if secret:
        msg.append(hs.encode_tag_frame(d, msg, secret))
    return msg


def test_same_secret_passes_both_ways():
    d = desc()
    assert hs.check_prefill_peer(d, hs.encode_layout(d, "k1"), "p:1", secret="k1") is None
    msg = _registration(d, "k1")
    assert hs.check_registration_tag("k1", hs.find_frame(msg), msg, "d:1") is None
    assert hs.bridges_for(d, hs.encode_layout(d, "k1")) == []  # the tagged layout parses


@pytest.mark.parametrize("prefill_secret,decode_secret,words", [
    ("k1", "k2", "wrong authentication tag"), (None, "k2", "sent no authentication tag"),
    ("k1", None, "this decode has none")])
def test_decode_refuses_prefill_of_another_deployment(prefill_secret, decode_secret, words):
    d = desc()
    reason = hs.check_prefill_peer(d, hs.encode_layout(d, prefill_secret), "10.0.0.1:8998",
                                   secret=decode_secret)
    assert reason is not None and words in reason and "10.0.0.1:8998" in reason
    assert "MEMHA_SHARED_SECRET" in reason or "another deployment" in reason


@pytest.mark.parametrize("prefill_secret,decode_secret,words", [
    ("k1", "k2", "wrong authentication tag"), ("k1", None, "sent no authentication tag"),
    (None, "k2", "this prefill has none")])
def test_prefill_refuses_decode_of_another_deployment(prefill_secret, decode_secret, words):
    msg = _registration(desc(), decode_secret)
    reason = hs.check_registration_tag(prefill_secret, hs.find_frame(msg), msg, "10.0.0.2:4000")
    assert reason is not None and words in reason and "10.0.0.2:4000" in reason


def test_tag_cannot_be_moved_to_another_registration_or_descriptor():
    d = desc()
    genuine = _registration(d, "k1")
    moved = _registration(d, None, session=b"10.6.6.6:15000") + [hs.find_tag_frame(genuine)]
    assert "wrong authentication tag" in hs.check_registration_tag("k1", hs.find_frame(moved), moved, "x")
    other = desc(model_id="other#2")
    swapped = genuine[:20] + [hs.encode_frame(other), hs.find_tag_frame(genuine)]
    assert "wrong authentication tag" in hs.check_registration_tag("k1", hs.find_frame(swapped), swapped, "x")
    layout = hs.encode_layout(d, "k1")
    forged = layout.replace('"m#1"', '"other#2"')
    assert forged != layout and "wrong authentication tag" in hs.check_layout_tag("k1", forged, "x")


# ---- per-request metadata (bootstrap room) gate ----------------------------------------------
def _room_msg(room=21, session="10.0.0.2:17001", indices=(4, 5, 6)):
    """The 10 frames SGLang 0.5.23's decode sends per request (build_receiver_metadata_message)."""
    import numpy as np
    return [str(room).encode(), b"10.0.0.2", b"17000", session.encode(),
            np.asarray(indices, np.int32).tobytes(), b"3", b"", b"1", b"0", b""]


def test_room_gate_passes_genuine_rooms():
    msg = _room_msg()
    assert hs.check_room_message(msg, None, {"10.0.0.2:17001"}, {}) is None
    tagged = msg + [hs.encode_room_tag_frame(msg, "k1")]
    assert hs.check_room_message(tagged, "k1", {"10.0.0.2:17001"}, {}) is None


def test_room_gate_refuses_unregistered_sessions():
    reason = hs.check_room_message(_room_msg(session="6.6.6.6:1"), None, {"10.0.0.2:17001"}, {})
    assert "never registered" in reason and "6.6.6.6:1" in reason and "room 21" in reason


@pytest.mark.parametrize("change", ["room", "indices", "session_port", "none", "secret"])
def test_room_gate_refuses_forged_or_moved_tags(change):
    genuine = _room_msg()
    tag = hs.encode_room_tag_frame(genuine, "k2" if change == "secret" else "k1")
    msg = {"room": _room_msg(room=22), "indices": _room_msg(indices=(7, 8, 9)),
           "session_port": _room_msg(session="10.0.0.2:17002")}.get(change, genuine)
    frames = msg if change == "none" else msg + [tag]
    reason = hs.check_room_message(frames, "k1", {"10.0.0.2:17001", "10.0.0.2:17002"}, {})
    assert reason is not None and "forged bootstrap room" in reason, reason
    assert ("without an authentication tag" if change == "none" else "wrong authentication tag") in reason


def test_room_gate_leaves_refused_registrations_to_sglang():
    # SGLang fails such rooms itself, with the registration's reason, and sends no byte
    assert hs.check_room_message(_room_msg(), "k1", {"10.0.0.2:17001"}, {"10.0.0.2:17001": "x"}) is None


@pytest.mark.parametrize("msg", [[], [b"21"], [b"21", b"h", b"p", b"s", b"", b"", b"", b"1"],
                                 [b"\xff", b"h", b"1", b"s", b"", b"", b"", b"1"], [1, 2, 3, 4, 5, 6, 7, 8]])
def test_room_gate_malformed_is_a_message_not_a_crash(msg):
    assert "malformed KV metadata" in hs.check_room_message(msg, None, {"s"}, {})
