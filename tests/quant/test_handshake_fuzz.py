"""Fuzzing the handshake parsers with peer-controlled input (hypothesis).

Contract under test: whatever bytes / strings / JSON values a peer server sends,

* ``FormatDescriptor.from_bytes`` / ``from_dict`` return a *valid* descriptor (it re-encodes and
  parses back to itself) or raise ``ValueError`` with a message naming the field;
* ``handshake.check_prefill_peer`` / ``check_decode_peer`` return ``None`` or a reason string
  naming the peer, never raise;
* ``handshake.find_frame`` returns ``None`` or the first ``MEMHA1`` frame after SGLang's 20;
* ``handshake.bridges_for`` returns bridges the transfer path applies (after a ``None`` verdict),
  or raises ``ValueError``.

Inputs: random bytes / text, truncations and byte mutations of valid encodings of every format,
valid dicts with fields set to wrong JSON types, huge and negative numbers, missing and extra
fields, other versions. ``eval/fuzz_handshake.py`` runs the same properties with a fixed seed and
more examples and records the count in ``eval/results/fuzz_handshake.json``.
"""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sglang_memha.kvformat import FORMAT_VERSION, Bridge, FormatDescriptor, KVFormat, format_spec
from sglang_memha.kvformat.descriptor import LAYOUTS
from sglang_memha.kvformat.spec import SUPPORTED_VERSIONS
from sglang_memha.kvformat.transforms import K_TRANSFORMS
from sglang_memha.sglang_ext.transfer import handshake as hs

PEER = "10.9.8.7:4242"
FIELDS = ("fmt", "page_size", "num_kv_heads", "head_dim", "num_layers", "model_id", "k_transform",
          "layout", "version")

# ---- strategies -------------------------------------------------------------------------------

HUGE_INTS = st.sampled_from([0, -1, -(2**31), 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64,
                             -(2**63), 10**100, -(10**100), 10**4000])


@st.composite
def descriptors(draw) -> FormatDescriptor:
    """A valid descriptor of any format (head_dim a multiple the format accepts)."""
    fmt = draw(st.sampled_from(list(KVFormat)))
    mult = format_spec(fmt).head_dim_multiple
    return FormatDescriptor(
        fmt=fmt,
        page_size=draw(st.one_of(st.sampled_from([1, 16, 64]), st.integers(1, 2**40))),
        num_kv_heads=draw(st.integers(1, 128)),
        head_dim=mult * draw(st.integers(1, 512 // mult)),
        num_layers=draw(st.integers(1, 200)),
        model_id=draw(st.sampled_from(["m#1", "Qwen/Qwen3-8B@cfg:1a2b"]) | st.text(min_size=1, max_size=24)),
        k_transform=draw(st.sampled_from(K_TRANSFORMS)),
        layout=draw(st.sampled_from(LAYOUTS)),
        version=draw(st.just(FORMAT_VERSION) | st.integers(1, 2**64)),
    )


# Any JSON value Python's json module emits (NaN / Infinity included), nested a little.
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), HUGE_INTS,
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(list(KVFormat)).map(lambda f: f.value), st.sampled_from(["", "NHD", "none", "16"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def mangled_dicts(draw) -> dict:
    """A valid descriptor's dict with 1-4 edits: a field set to any JSON value, a number made
    huge / negative / zero / a float / a bool, a field dropped, an unknown field added."""
    d = draw(descriptors()).to_dict()
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["set", "number", "drop", "extra", "version"]))
        name = draw(st.sampled_from(FIELDS))
        if op == "set":
            d[name] = draw(json_values)
        elif op == "number":
            d[name] = draw(HUGE_INTS | st.integers() | st.booleans()
                           | st.floats(allow_nan=True) | st.integers(1, 512).map(float))
        elif op == "drop":
            d.pop(name, None)
        elif op == "extra":
            d[draw(st.text(max_size=10))] = draw(json_values)
        else:
            d["version"] = draw(st.integers(-3, 5) | HUGE_INTS)
    return d


def _dumps(d: object) -> bytes:
    return json.dumps(d).encode()


@st.composite
def mutated_encodings(draw) -> bytes:
    """``to_bytes()`` of a valid descriptor, truncated or with 1-3 byte edits (replace, insert,
    delete, bit flip, duplicated slice) -- the near-misses a fuzzer rarely reaches from noise."""
    raw = bytearray(draw(descriptors()).to_bytes())
    if draw(st.booleans()):
        return bytes(raw[: draw(st.integers(0, len(raw) - 1))])
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "flip", "dup"]))
        if op == "insert" or i == len(raw):
            raw.insert(i, draw(st.integers(0, 255) | st.sampled_from(b'{}[]",:0-9eE.\\')))
        elif op == "replace":
            raw[i] = draw(st.integers(0, 255) | st.sampled_from(b'{}[]",:0-9eE.\\'))
        elif op == "delete":
            del raw[i]
        elif op == "flip":
            raw[i] ^= 1 << draw(st.integers(0, 7))
        else:
            j = draw(st.integers(i, min(len(raw), i + 12)))
            raw[i:i] = raw[i:j]
    return bytes(raw)


special_payloads = st.sampled_from([
    b"", b"{", b"}", b"[]", b"null", b"0", b'""', b"NaN", b"\xef\xbb\xbf{}", b"\xff\xfe", b"\x00",
    b"[" * 5000, b"{\"a\":" * 5000, b'{"page_size":' + b"9" * 5000 + b"}",
    b'{"fmt":"bf16","fmt":"int8"}', b"\xed\xa0\x80", b'"\\ud800"',
])

payloads = st.one_of(
    st.binary(max_size=256), st.text(max_size=128).map(str.encode), mutated_encodings(),
    mangled_dicts().map(_dumps), json_values.map(_dumps), special_payloads,
)

# What a prefill can publish as kv_layout: SGLang's bootstrap JSON carries any JSON value.
kv_layouts = st.one_of(
    payloads.map(lambda b: hs.LAYOUT_PREFIX + b.decode("utf-8", "surrogateescape")),
    st.text(max_size=64).map(lambda t: hs.LAYOUT_PREFIX + t),
    st.text(max_size=64), json_values, st.sampled_from(["memha/1", "memha/1", "memha/2:{}", "MEMHA1{}"]),
)

frames = st.one_of(
    payloads.map(lambda b: hs.FRAME_PREFIX + b), payloads,
    payloads.map(lambda b: bytearray(hs.FRAME_PREFIX + b)), st.sampled_from([b"MEMHA", b"MEMHA2{}"]),
)

# A registration message: SGLang's frames, then any extra frames (ours somewhere, maybe not).
zmq_frame = st.one_of(st.binary(max_size=16), frames, st.none(), st.integers(), st.text(max_size=8))
messages = st.lists(zmq_frame, max_size=26)

# ---- properties (plain functions: eval/fuzz_handshake.py runs them too) ------------------------


def assert_valid(d: FormatDescriptor) -> None:
    assert isinstance(d.fmt, KVFormat)
    for name in ("page_size", "num_kv_heads", "head_dim", "num_layers", "version"):
        v = getattr(d, name)
        assert type(v) is int and v > 0, (name, v)
    assert d.head_dim % format_spec(d.fmt).head_dim_multiple == 0
    assert type(d.model_id) is str and d.model_id
    assert d.k_transform in K_TRANSFORMS and d.layout in LAYOUTS
    assert FormatDescriptor.from_bytes(d.to_bytes()) == d


def assert_clear_error(e: ValueError) -> None:
    msg = str(e)
    assert msg and ("FormatDescriptor" in msg or "kv format" in msg or any(f in msg for f in FIELDS)), msg


def _parses_or_clear_error(parse, x) -> None:
    try:
        d = parse(x)
    except ValueError as e:
        assert_clear_error(e)
        return
    assert_valid(d)


def prop_from_bytes(raw: bytes) -> None:
    _parses_or_clear_error(FormatDescriptor.from_bytes, raw)


def prop_from_dict(d: object) -> None:
    _parses_or_clear_error(FormatDescriptor.from_dict, d)


def prop_check_prefill_peer(local: FormatDescriptor, kv_layout: object) -> None:
    reason = hs.check_prefill_peer(local, kv_layout, PEER)
    if reason is None:
        bridges = hs.bridges_for(local, kv_layout)
        assert set(bridges) <= hs.APPLIED_BRIDGES, bridges
        return
    assert isinstance(reason, str) and PEER in reason, reason
    try:
        bridges = hs.bridges_for(local, kv_layout)
    except ValueError:
        return
    assert all(isinstance(b, Bridge) for b in bridges)


def prop_check_decode_peer(local: FormatDescriptor, frame: object) -> None:
    reason = hs.check_decode_peer(local, frame, PEER)
    assert reason is None or (isinstance(reason, str) and PEER in reason), reason


SECRET = "s3cret"


def prop_check_layout_tag(local: FormatDescriptor, kv_layout: object) -> None:
    """Any layout, judged with and without a secret: None or a reason naming the peer, and the
    whole decode check stays total when the prefix claims a tag."""
    for secret in (None, SECRET):
        reason = hs.check_layout_tag(secret, kv_layout, PEER)
        assert reason is None or (isinstance(reason, str) and PEER in reason), reason
        if isinstance(kv_layout, str):
            tagged = hs.AUTH_LAYOUT_PREFIX + kv_layout
            assert hs.check_layout_tag(SECRET, tagged, PEER) is not None  # never a valid tag by chance
            prop_check_prefill_peer(local, tagged)


def prop_check_registration_tag(local: FormatDescriptor, msg: list) -> None:
    frame = hs.find_frame(msg)
    for secret in (None, SECRET):
        reason = hs.check_registration_tag(secret, frame, msg, PEER)
        assert reason is None or (isinstance(reason, str) and PEER in reason), reason
        if secret and reason is None:  # only a genuine tag passes
            assert hs.find_tag_frame(msg) == hs.encode_tag_frame(
                FormatDescriptor.from_bytes(frame[len(hs.FRAME_PREFIX):]), msg, secret)


def prop_find_frame(local: FormatDescriptor, msg: list) -> None:
    found = hs.find_frame(msg)
    ours = [bytes(f) for f in msg[20:] if isinstance(f, (bytes, bytearray)) and f.startswith(hs.FRAME_PREFIX)]
    assert found == (ours[0] if ours else None)
    prop_check_decode_peer(local, found)


def prop_valid_round_trip(local: FormatDescriptor, peer: FormatDescriptor) -> None:
    assert FormatDescriptor.from_bytes(peer.to_bytes()) == peer
    assert (hs.check_prefill_peer(peer, hs.encode_layout(peer), PEER) is None) == (peer.version in SUPPORTED_VERSIONS)
    prop_check_prefill_peer(local, hs.encode_layout(peer))
    msg = [b""] * 20 + [hs.encode_frame(peer)]
    prop_find_frame(local, msg)


# (name, property, strategies, share of the examples): the table eval/fuzz_handshake.py runs.
PROPERTIES = [
    ("FormatDescriptor.from_bytes", prop_from_bytes, (payloads,), 0.30),
    ("FormatDescriptor.from_dict", prop_from_dict, (mangled_dicts() | json_values,), 0.15),
    ("handshake.check_prefill_peer+bridges_for", prop_check_prefill_peer, (descriptors(), kv_layouts), 0.25),
    ("handshake.check_decode_peer", prop_check_decode_peer, (descriptors(), frames), 0.15),
    ("handshake.find_frame", prop_find_frame, (descriptors(), messages), 0.10),
    ("handshake.encode_layout/encode_frame round trip", prop_valid_round_trip,
     (descriptors(), descriptors()), 0.05),
    ("handshake.check_layout_tag", prop_check_layout_tag, (descriptors(), kv_layouts), 0.05),
    ("handshake.check_registration_tag", prop_check_registration_tag, (descriptors(), messages), 0.05),
]

# ---- pytest -----------------------------------------------------------------------------------

# ~2500 examples in all: a few seconds on one core. eval/fuzz_handshake.py runs 20000.
FUZZ = settings(max_examples=500, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(payloads)
def test_from_bytes(raw):
    prop_from_bytes(raw)


@FUZZ
@given(mangled_dicts() | json_values)
def test_from_dict(d):
    prop_from_dict(d)


@FUZZ
@given(descriptors(), kv_layouts)
def test_check_prefill_peer(local, kv_layout):
    prop_check_prefill_peer(local, kv_layout)


@FUZZ
@given(descriptors(), frames)
def test_check_decode_peer(local, frame):
    prop_check_decode_peer(local, frame)


@settings(FUZZ, max_examples=200)
@given(descriptors(), messages)
def test_find_frame(local, msg):
    prop_find_frame(local, msg)


@settings(FUZZ, max_examples=200)
@given(descriptors(), kv_layouts)
def test_check_layout_tag(local, kv_layout):
    prop_check_layout_tag(local, kv_layout)


@settings(FUZZ, max_examples=200)
@given(descriptors(), messages)
def test_check_registration_tag(local, msg):
    prop_check_registration_tag(local, msg)


@settings(FUZZ, max_examples=200)
@given(descriptors(), descriptors())
def test_valid_round_trip(local, peer):
    prop_valid_round_trip(local, peer)


def test_known_crashers_are_clean_errors():
    """The inputs that crashed the parsers before the fix (see eval/results/fuzz_handshake.json)."""
    local = FormatDescriptor(fmt="bf16", page_size=16, num_kv_heads=2, head_dim=64, num_layers=2, model_id="m")
    for raw in (b"[" * 100_000, b'{"fmt":"bf16"}', b'{"page_size":' + b"9" * 5000 + b"}"):
        prop_from_bytes(raw)
    prop_from_dict({1: 2, "a": 3})
    prop_from_dict(["fmt"])
    prop_from_dict({**local.to_dict(), "head_dim": True})
    for layout in (hs.LAYOUT_PREFIX + "\ud800", b"memha/1:{}", 7, ["memha/1:"]):
        prop_check_prefill_peer(local, layout)
    for frame in (b"", b"XX", bytearray(hs.encode_frame(local)), "MEMHA1{}"):
        prop_check_decode_peer(local, frame)
