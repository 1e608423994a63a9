"""Handshake descriptor: serialization round trip, bridges, and errors naming both sides."""

from __future__ import annotations

import dataclasses

import pytest

from sglang_memha.kvformat import FORMAT_VERSION, SENDER_BRIDGES, Bridge, FormatDescriptor, FormatMismatchError
from sglang_memha.kvformat.spec import SUPPORTED_VERSIONS

BASE = FormatDescriptor(fmt="fp8_e4m3", page_size=16, num_kv_heads=8, head_dim=128, num_layers=36,
                        model_id="Qwen/Qwen3-8B@cfg:1a2b")


def test_bytes_round_trip_and_canonical():
    raw = BASE.to_bytes()
    assert FormatDescriptor.from_bytes(raw) == BASE
    assert raw.startswith(b'{"fmt":"fp8_e4m3","head_dim":128')
    assert FormatDescriptor.from_dict(BASE.to_dict()) == BASE


def test_identical_needs_no_bridge():
    assert BASE.check_compatible(dataclasses.replace(BASE)) == []


@pytest.mark.parametrize(
    "local_fmt, peer_fmt, bridge",
    [
        ("fp8_e4m3", "fp8_e4m3fnuz", Bridge.FNUZ_TO_FN),
        ("fp8_e4m3fnuz", "fp8_e4m3", Bridge.FN_TO_FNUZ),
        ("fp8_e4m3", "fp8_e4m3_tensor", Bridge.LAYER_TO_TOKEN_SCALE),
    ],
)
def test_exact_format_bridges(local_fmt, peer_fmt, bridge):
    local = dataclasses.replace(BASE, fmt=local_fmt)
    assert local.check_compatible(dataclasses.replace(BASE, fmt=peer_fmt)) == [bridge]


@pytest.mark.parametrize("local_fmt", ["fp8_e4m3", "fp8_e4m3_tensor", "int8", "int4_g32", "bfp8"])
def test_bf16_peer_is_encoded_on_send(local_fmt):
    local = dataclasses.replace(BASE, fmt=local_fmt)
    assert local.check_compatible(dataclasses.replace(BASE, fmt="bf16")) == [Bridge.ENCODE_ON_SEND]
    assert Bridge.ENCODE_ON_SEND in SENDER_BRIDGES and Bridge.FNUZ_TO_FN not in SENDER_BRIDGES


def test_encode_on_send_applies_the_receivers_k_transform_only_to_untransformed_rows():
    had = dataclasses.replace(BASE, k_transform="hadamard")
    assert had.check_compatible(dataclasses.replace(BASE, fmt="bf16")) == [Bridge.ENCODE_ON_SEND]
    with pytest.raises(FormatMismatchError, match="k_transform: local='none' peer='hadamard'"):
        BASE.check_compatible(dataclasses.replace(BASE, fmt="bf16", k_transform="hadamard"))
    with pytest.raises(FormatMismatchError, match="k_transform"):  # data bytes kept: must agree
        had.check_compatible(dataclasses.replace(BASE, fmt="fp8_e4m3_tensor"))


def test_page_size_is_bridgeable():
    assert BASE.check_compatible(dataclasses.replace(BASE, page_size=64)) == [Bridge.REPAGE]


def test_mismatch_names_every_field_with_both_values():
    peer = dataclasses.replace(BASE, fmt="int4_kivi", head_dim=64, model_id="other", k_transform="hadamard")
    with pytest.raises(FormatMismatchError) as ei:
        BASE.check_compatible(peer)
    msg = str(ei.value)
    for part in ("fmt: local='fp8_e4m3' peer='int4_kivi'", "head_dim: local=128 peer=64",
                 "model_id: local='Qwen/Qwen3-8B@cfg:1a2b' peer='other'",
                 "k_transform: local='none' peer='hadamard'"):
        assert part in msg
    assert [m[0] for m in ei.value.mismatches] == ["fmt", "head_dim", "model_id", "k_transform"]


@pytest.mark.parametrize("local_fmt, peer_fmt", [
    ("int8", "fp8_e4m3fnuz"), ("int4_g64", "fp8_e4m3fnuz"), ("fp8_e4m3", "int8"), ("bf16", "fp8_e4m3"),
    ("fp8_e4m3_tensor", "fp8_e4m3"), ("int8", "fp8_e4m3_tensor"), ("int4_g32", "bfp8")])
def test_other_quantized_peers_are_requantized_on_send(local_fmt, peer_fmt):
    """No exact bridge between two token-local formats: the sender dequantizes and re-quantizes."""
    local = dataclasses.replace(BASE, fmt=local_fmt)
    assert local.check_compatible(dataclasses.replace(BASE, fmt=peer_fmt)) == [Bridge.REQUANTIZE_ON_SEND]
    assert Bridge.REQUANTIZE_ON_SEND in SENDER_BRIDGES
    # with another page size too: converted, then re-paged
    assert local.check_compatible(dataclasses.replace(BASE, fmt=peer_fmt, page_size=32)) == [
        Bridge.REQUANTIZE_ON_SEND, Bridge.REPAGE]


def test_requantize_on_send_k_transform_and_block_coded_rules():
    had = dataclasses.replace(BASE, fmt="int8", k_transform="hadamard")
    # an untransformed sender's dequantized K is rotated for the receiver; a rotated one stays rotated
    assert had.check_compatible(dataclasses.replace(BASE, fmt="fp8_e4m3fnuz")) == [Bridge.REQUANTIZE_ON_SEND]
    assert had.check_compatible(dataclasses.replace(had, fmt="fp8_e4m3fnuz")) == [Bridge.REQUANTIZE_ON_SEND]
    with pytest.raises(FormatMismatchError) as ei:  # the receiver cannot hold rotated K
        dataclasses.replace(BASE, fmt="int8").check_compatible(dataclasses.replace(had, fmt="fp8_e4m3fnuz"))
    assert ei.value.mismatches == [("k_transform", "none", "hadamard")]
    for fmt in ("int4_kivi", "int4_kivi_g64"):
        kivi = dataclasses.replace(BASE, fmt=fmt, page_size=32)
        for local, peer in ((kivi, dataclasses.replace(BASE, fmt="int8", page_size=32)),
                            (dataclasses.replace(BASE, fmt="int8", page_size=32), kivi)):
            with pytest.raises(FormatMismatchError) as ei:  # K blocks are not rows: never converted
                local.check_compatible(peer)
            assert ei.value.mismatches == [("fmt", local.fmt.value, peer.fmt.value)]
    g32, g64 = (dataclasses.replace(BASE, fmt=f, page_size=32) for f in ("int4_kivi", "int4_kivi_g64"))
    with pytest.raises(FormatMismatchError) as ei:  # the same K blocks, other V rows: not converted either
        g32.check_compatible(g64)
    assert ei.value.mismatches == [("fmt", "int4_kivi", "int4_kivi_g64")]
    assert g64.check_compatible(dataclasses.replace(g64)) == []


def test_unsupported_version_named():
    peer = dataclasses.replace(BASE, version=7)
    with pytest.raises(FormatMismatchError, match=f"version: local={FORMAT_VERSION} peer=7"):
        BASE.check_compatible(peer)


@pytest.mark.parametrize("old", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e4m3fnuz", "bf16", "int4_g64"])
def test_older_peers_refused_both_ways(fmt, old):
    """fp8_e4m3 scale rows are 4-byte fp32 in v1, 1-byte E8M0 in v2, 2-byte bf16 in v3: same name,
    other bytes; v3 interleaves scales with data in one row, v4 keeps them in their own buffer.
    v1, v2 and v3 peers are refused for every format (a version names the byte format
    as a whole), with both versions in the message."""
    assert FORMAT_VERSION == 4 and SUPPORTED_VERSIONS == {4}
    local = dataclasses.replace(BASE, fmt=fmt)
    raw = local.to_bytes()
    assert b'"version":4' in raw
    peer = FormatDescriptor.from_bytes(raw.replace(b'"version":4', b'"version":%d' % old))
    with pytest.raises(FormatMismatchError, match=f"version: local=4 peer={old}") as ei:
        local.check_compatible(peer)
    assert ei.value.mismatches == [("version", 4, old)]
    assert str(ei.value) == (f"KV format mismatch with peer (not bridgeable): version: local=4 peer={old} "
                             f"(KV byte format versions differ; this build reads [4]: run the same "
                             f"sglang-memha release on prefill and decode)")
    with pytest.raises(FormatMismatchError, match=f"version: local={old} peer=4"):
        peer.check_compatible(local)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(page_size=0), r"FormatDescriptor.page_size=0: expected a positive int"),
        (dict(fmt="fp5"), r"kv format 'fp5' is not supported"),
        (dict(fmt="int4_g64", head_dim=96), r"head_dim=96 is not valid for int4_g64"),
        (dict(layout="HND"), r"FormatDescriptor.layout='HND'"),
        (dict(k_transform="rot"), r"FormatDescriptor.k_transform='rot'"),
        (dict(model_id=""), r"FormatDescriptor.model_id=''"),
    ],
)
def test_invalid_descriptor_fields(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(BASE, **change)


def test_from_bytes_errors():
    with pytest.raises(ValueError, match="not UTF-8 JSON"):
        FormatDescriptor.from_bytes(b"\xff")
    with pytest.raises(ValueError, match=r"fields \['colour'\] are unknown"):
        FormatDescriptor.from_dict({**BASE.to_dict(), "colour": 1})


# ---- different attention TP sizes (check_compatible's tp) ----------------------------------------
def test_other_attention_tp_compares_heads_times_tp():
    """num_kv_heads is per rank: 8 heads at TP 1 = 4 x 2 = 2 x 4 (the rows are sliced by head on
    send, no bridge); an arrival bridge still applies; a wrong product names both sides."""
    tp2 = dataclasses.replace(BASE, num_kv_heads=4)
    assert BASE.check_compatible(tp2, tp=(1, 2)) == [] and tp2.check_compatible(BASE, tp=(2, 1)) == []
    assert dataclasses.replace(BASE, num_kv_heads=2).check_compatible(tp2, tp=(4, 2)) == []
    assert BASE.check_compatible(dataclasses.replace(tp2, fmt="fp8_e4m3fnuz"), tp=(1, 2)) == [Bridge.FNUZ_TO_FN]
    with pytest.raises(FormatMismatchError) as e:
        BASE.check_compatible(tp2, tp=(1, 4))
    assert str(e.value) == ("KV format mismatch with peer (not bridgeable): num_kv_heads x attention TP (the "
                            "model's KV heads differ, or KV heads replicated over TP ranks, which are not "
                            "head-sliced: use the same --tp-size on both servers): local='8 heads x TP 1' "
                            "peer='4 heads x TP 4'")
    with pytest.raises(FormatMismatchError, match="num_kv_heads: local=8 peer=4$"):  # same TP: per rank
        BASE.check_compatible(tp2, tp=(2, 2))


def test_replicated_kv_heads_are_refused():
    """2 KV heads at decode TP 4: each rank holds one head, replicated twice; 1 x 4 != 2 x 1."""
    two = dataclasses.replace(BASE, num_kv_heads=2)
    with pytest.raises(FormatMismatchError, match=r"local='1 heads x TP 4' peer='2 heads x TP 1'$"):
        dataclasses.replace(BASE, num_kv_heads=1).check_compatible(two, tp=(4, 1))


@pytest.mark.parametrize("peer_change, bridge", [({"page_size": 32}, "repage"),
                                                  ({"fmt": "bf16"}, "encode_on_send"),
                                                  ({"fmt": "fp8_e4m3_tensor"}, "layer_to_token_scale")])
def test_other_attention_tp_is_not_combined_with_a_sender_bridge(peer_change, bridge):
    peer = dataclasses.replace(BASE, num_kv_heads=4, **peer_change)
    assert bridge in [b.value for b in BASE.check_compatible(dataclasses.replace(peer, num_kv_heads=8))]
    with pytest.raises(FormatMismatchError) as e:
        BASE.check_compatible(peer, tp=(1, 2))
    assert str(e.value) == (f"KV format mismatch with peer (not bridgeable): attention TP (head slicing is not "
                            f"combined with the send-time bridge(s) ['{bridge}']: use the same format and page "
                            f"size on both servers, or the same --tp-size): local=1 peer=2")


@pytest.mark.parametrize("tp", [(0, 1), (1, True), (2, "2")])
def test_tp_must_be_positive_ints(tp):
    with pytest.raises(ValueError, match=r"check_compatible tp=.*: expected two positive ints"):
        BASE.check_compatible(BASE, tp=tp)
