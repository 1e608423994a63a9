"""The sglang-memha PD handshake: how a ``FormatDescriptor`` rides on SGLang's bootstrap.

Pure functions (no SGLang import), so every verdict is unit-tested without servers.

* prefill -> decode: ``KVArgs.kv_layout = encode_layout(desc)`` = ``"memha/1:" + descriptor
  JSON``. SGLang's bootstrap server stores it at prefill registration and hands it to decode in
  ``PrefillServerInfo.kv_layout``; ``check_prefill_peer`` judges it on decode.
* decode -> prefill: one extra ZMQ frame ``b"MEMHA1" + descriptor JSON`` appended to decode's
  KV-args registration (``encode_frame``); ``check_decode_peer`` judges it on prefill.

``memha/1`` / ``MEMHA1`` version the *framing* and the pool row layout (a page row of one
(token, head) is ``[data | scale]`` bytes, see ``quant_pool``); the byte format itself is
versioned by ``kvformat.FORMAT_VERSION`` inside the descriptor. Both checks return ``None``
(compatible) or a message naming the peer and both sides' values (a ``Refusal``: a ``str`` that
also names its cause, for the refusal counter); the caller fails the request with it. Whatever a
peer sends (truncated, mutated, wrong types, not UTF-8), the checks return a message and never
raise; ``bridges_for`` and ``FormatDescriptor.from_bytes`` raise only
``ValueError`` (tests/quant/test_handshake_fuzz.py).

**Shared secret** (``MEMHA_SHARED_SECRET`` on both servers, optional): each side also proves it
belongs to the deployment with an HMAC-SHA256 tag. Prefill: the layout becomes
``"memha/1a:" + tag + ":" + descriptor JSON``, tag over the descriptor. Decode: one more frame
``b"MEMHAT" + tag``, tag over the descriptor and the registration frames that say where KV is
written (endpoint, port, Mooncake session, KV buffer addresses), so a tag cannot be moved to
another registration. A missing, unexpected or wrong tag fails the request (decode: before it
allocates or registers anything; prefill: before it writes a byte). Each request's metadata
message (its bootstrap room and destination pages) carries a ``MEMHAT`` tag over all its frames
too (``encode_room_tag_frame``); ``check_room_message`` refuses, before SGLang parses it, a
malformed message, a room naming a decode session that never registered, and (with a secret) a
room whose tag is missing or wrong: a forged bootstrap room gets no byte. Limit: the prefill's tag is
static, so a copy of a genuine layout replayed by a host that can also impersonate the prefill's
bootstrap address passes the decode's check; use network isolation (or TLS) against that.
"""
from __future__ import annotations

import hashlib
import hmac

from sglang_memha.kvformat import SENDER_BRIDGES, Bridge, FormatDescriptor, FormatMismatchError

LAYOUT_PREFIX = "memha/1:"
AUTH_LAYOUT_PREFIX = "memha/1a:"
FRAME_PREFIX = b"MEMHA1"
TAG_FRAME_PREFIX = b"MEMHAT"
_TAG_HEX = 64  # SHA-256

# Why a peer or a message was refused, as a fixed code: the ``reason`` label of
# ``sglang:memha_handshake_refusals_total`` (``sglang_ext/metrics``). The first six come from the
# checks here; ``conversion`` (a decode whose pages this prefill cannot convert, re-page or head-slice,
# ``conn_bridges``) and ``prefill_layout`` (a decode refusing a prefill's page size, KV dtype or
# layout, ``conn_handshake``) from the manager.
REFUSAL_KINDS = ("no_descriptor", "malformed", "format_mismatch", "unsupported_bridge", "auth",
                 "unregistered_session", "conversion", "prefill_layout")


class Refusal(str):
    """A refusal message that also names its cause: ``kind``, one of ``REFUSAL_KINDS``, so the
    refusals can be counted by cause without parsing their text. It is the ``str`` every caller
    already logs, compares and sends; pickling gives a plain ``str`` (a reason may cross a
    process boundary inside SGLang's abort messages)."""

    kind: str

    def __new__(cls, kind: str, text: str) -> "Refusal":
        if kind not in REFUSAL_KINDS:
            raise ValueError(f"refusal kind {kind!r}: expected one of {REFUSAL_KINDS}")
        self = super().__new__(cls, text)
        self.kind = kind
        return self

    def __reduce__(self):
        return str, (str(self),)


def _tag(secret: str, label: bytes, *parts: bytes) -> str:
    mac = hmac.new(secret.encode(), label, hashlib.sha256)
    for part in parts:  # length-prefixed: no two part lists hash alike
        mac.update(len(part).to_bytes(8, "little") + part)
    return mac.hexdigest()


def encode_layout(desc: FormatDescriptor, secret: str | None = None) -> str:
    payload = desc.to_bytes()
    if secret:
        return f"{AUTH_LAYOUT_PREFIX}{_tag(secret, b'memha-layout', payload)}:{payload.decode()}"
    return LAYOUT_PREFIX + payload.decode()


def _registration_parts(msg: list[bytes]) -> list[bytes]:
    # SGLang 0.5.23 registration frames 1..4: endpoint, port, Mooncake session id, KV pointers.
    return _frames(msg[1:5])


def encode_tag_frame(desc: FormatDescriptor, msg: list[bytes], secret: str) -> bytes:
    """Decode side: the ``MEMHAT`` frame for registration ``msg`` (SGLang's frames)."""
    return TAG_FRAME_PREFIX + _tag(secret, b"memha-registration", desc.to_bytes(),
                                   *_registration_parts(msg)).encode()


def find_tag_frame(msg: list[bytes]) -> bytes | None:
    for frame in msg[20:]:
        if isinstance(frame, (bytes, bytearray)) and frame.startswith(TAG_FRAME_PREFIX):
            return bytes(frame)
    return None


def check_registration_tag(secret: str | None, frame: bytes | None, msg: list[bytes],
                           peer: str) -> str | None:
    """Prefill side: None when the decode's registration carries the right tag (or neither side
    has a secret), else the reason. ``frame`` is the raw ``MEMHA1`` descriptor frame."""
    tag = find_tag_frame(msg)
    if not secret:
        return None if tag is None else Refusal(
            "auth", f"decode at {peer} authenticates with a shared secret but this prefill has none: set "
                    f"the same MEMHA_SHARED_SECRET on both servers")
    if tag is None or frame is None:
        return Refusal("auth",
                       f"decode at {peer} sent no authentication tag: it has no MEMHA_SHARED_SECRET (another "
                       f"deployment, or a misconfigured server); set the same secret on both servers")
    expect = _tag(secret, b"memha-registration", bytes(frame)[len(FRAME_PREFIX):],
                  *_registration_parts(msg))
    if not hmac.compare_digest(expect.encode(), tag[len(TAG_FRAME_PREFIX):]):
        return Refusal("auth",
                       f"decode at {peer} sent a wrong authentication tag: its MEMHA_SHARED_SECRET differs "
                       f"(another deployment?); refusing to send it KV")
    return None


# SGLang 0.5.23 per-request metadata frames (``build_receiver_metadata_message``): room,
# endpoint, port, Mooncake session id, KV indices, aux index, state indices,
# required_dst_info_num, decode_prefix_len, device KV indices. Our tag frame goes after them.
_ROOM_FRAMES = 10


def encode_room_tag_frame(msg: list[bytes], secret: str) -> bytes:
    """Decode side: the ``MEMHAT`` frame for one request's metadata ``msg`` (SGLang's frames),
    tag over all of them: a room cannot be claimed, or its destination pages changed, without
    the secret."""
    return TAG_FRAME_PREFIX + _tag(secret, b"memha-room", *_frames(msg[:_ROOM_FRAMES])).encode()


def _frames(msg: list[bytes]) -> list[bytes]:
    return [bytes(f) if isinstance(f, (bytes, bytearray)) else b"" for f in msg]


def check_room_message(msg: list[bytes], secret: str | None, registered, rejected) -> str | None:
    """Prefill side, bootstrap thread: None when SGLang may take this per-request metadata
    message (room, destination session and pages), else why it is refused (a malformed,
    unregistered or forged bootstrap room). ``registered``/``rejected``: containers of decode
    session ids that registered with this prefill / whose registration was refused (SGLang
    itself fails those rooms with the registration's reason, so they pass here). Never raises."""
    try:
        frames = _frames(msg)
        if len(frames) < 8:
            return Refusal("malformed",
                           f"malformed KV metadata ({len(frames)} frames, SGLang sends {_ROOM_FRAMES})")
        room, session = frames[0].decode("ascii"), frames[3].decode("ascii")
        int(room), int(frames[2]), int(frames[7])
    except (UnicodeDecodeError, ValueError) as e:
        return Refusal("malformed", f"malformed KV metadata ({e.__class__.__name__}: {e})")
    if session not in registered:
        return Refusal("unregistered_session",
                       f"bootstrap room {room}: KV metadata names decode session {session!r}, which never "
                       f"registered with this prefill (a forged or stale bootstrap room; a restarted "
                       f"decode re-registers on its next request); refused, no KV is sent for it")
    if not secret or session in rejected:
        return None
    tag = frames[_ROOM_FRAMES] if len(frames) > _ROOM_FRAMES else b""
    if not tag.startswith(TAG_FRAME_PREFIX):
        return Refusal("auth",
                       f"bootstrap room {room} from decode session {session}: KV metadata without an "
                       f"authentication tag although that decode registered with MEMHA_SHARED_SECRET "
                       f"(a forged bootstrap room?); refused, no KV is sent for it")
    expect = _tag(secret, b"memha-room", *frames[:_ROOM_FRAMES])
    if not hmac.compare_digest(expect.encode(), tag[len(TAG_FRAME_PREFIX):]):
        return Refusal("auth",
                       f"bootstrap room {room} from decode session {session}: wrong authentication tag "
                       f"on its KV metadata (a forged bootstrap room, or a changed destination); "
                       f"refused, no KV is sent for it")
    return None


def encode_frame(desc: FormatDescriptor) -> bytes:
    return FRAME_PREFIX + desc.to_bytes()


def find_frame(msg: list[bytes]) -> bytes | None:
    """The ``MEMHA1`` frame of a registration message, or None (stock decode)."""
    for frame in msg[20:]:  # SGLang 0.5.23 registration frames are indices 0..19
        if isinstance(frame, (bytes, bytearray)) and frame.startswith(FRAME_PREFIX):
            return bytes(frame)
    return None


def _missing(side: str, peer: str, local: FormatDescriptor, local_role: str) -> str:
    why = ("sglang-memha not installed there, MEMHA_KV_FORMAT unset, or MEMHA_ENCODE_ON_SEND=0 with "
           "a stock pool" if side == "prefill" else "sglang-memha not installed there, or MEMHA_KV_FORMAT unset")
    return Refusal("no_descriptor",
                   f"{side} at {peer} sent no sglang-memha KV format descriptor ({why}); this "
                   f"{local_role} uses fmt={local.fmt.value}. Start both servers with the same MEMHA_KV_FORMAT")


# Bridges the decode applies in place on arrival (``quant_pool.MemhaQuantKVPool.apply_bridge``):
# only those whose rows have the same size on both sides can land where Mooncake writes them.
APPLIED_BRIDGES = frozenset({Bridge.FNUZ_TO_FN, Bridge.FN_TO_FNUZ})


def _layout_payload(kv_layout: object) -> bytes:
    """The descriptor bytes of a ``memha/1:`` or ``memha/1a:`` layout string (the tag is not
    checked here: ``check_layout_tag``); ``ValueError`` for anything else."""
    if isinstance(kv_layout, str) and kv_layout.startswith(AUTH_LAYOUT_PREFIX):
        kv_layout = LAYOUT_PREFIX + kv_layout[len(AUTH_LAYOUT_PREFIX) + _TAG_HEX + 1:]
    if not isinstance(kv_layout, str) or not kv_layout.startswith(LAYOUT_PREFIX):
        shown = repr(kv_layout[:40]) if isinstance(kv_layout, str) else f"of type {type(kv_layout).__name__}"
        raise ValueError(f"kv_layout is {shown}: expected a str starting with {LAYOUT_PREFIX!r}")
    try:
        return kv_layout[len(LAYOUT_PREFIX):].encode()
    except UnicodeEncodeError as e:  # lone surrogates: a str that no UTF-8 bytes decode to
        raise ValueError(f"kv_layout is not UTF-8 text ({e}): expected {LAYOUT_PREFIX!r} + descriptor JSON") from None


def _frame_payload(frame: object) -> bytes:
    """The descriptor bytes of a ``MEMHA1`` frame; ``ValueError`` for anything else."""
    if not isinstance(frame, (bytes, bytearray, memoryview)) or not bytes(frame).startswith(FRAME_PREFIX):
        shown = repr(bytes(frame[:40])) if isinstance(frame, (bytes, bytearray, memoryview)) \
            else f"of type {type(frame).__name__}"
        raise ValueError(f"registration frame is {shown}: expected bytes starting with {FRAME_PREFIX!r}")
    return bytes(frame)[len(FRAME_PREFIX):]


def layout_descriptor(kv_layout: object) -> FormatDescriptor | None:
    """The descriptor a prefill's ``kv_layout`` carries, or None when it carries none (or a
    malformed one; ``check_prefill_peer`` names that per request). Never raises."""
    try:
        return FormatDescriptor.from_bytes(_layout_payload(kv_layout))
    except ValueError:
        return None


def bridges_for(local: FormatDescriptor, kv_layout: str, tp: tuple[int, int] = (1, 1)) -> list[Bridge]:
    """Decode side, after ``check_prefill_peer`` returned None: the bridges the decode applies on
    arrival (those the prefill applies while sending are left out). A layout that check would
    not pass raises ``ValueError`` (``FormatMismatchError`` included). ``tp``: (decode, prefill)
    attention TP sizes."""
    bridges = local.check_compatible(FormatDescriptor.from_bytes(_layout_payload(kv_layout)), tp)
    return [b for b in bridges if b in APPLIED_BRIDGES]


def frame_descriptor(frame: bytes) -> FormatDescriptor:
    """The descriptor of a decode's ``MEMHA1`` frame; ``ValueError`` for anything else."""
    return FormatDescriptor.from_bytes(_frame_payload(frame))


def send_target(local: FormatDescriptor, frame: bytes, tp: tuple[int, int] = (1, 1)) -> FormatDescriptor | None:
    """Prefill side, after ``check_decode_peer`` returned None for ``frame``: the decode's
    descriptor when the prefill must convert or re-page what it sends to it (a
    ``SENDER_BRIDGES`` bridge), else None (the pool's rows go as they are, or sliced by head
    when ``tp``, (decode, prefill) attention TP sizes, differ)."""
    decode = FormatDescriptor.from_bytes(_frame_payload(frame))
    return decode if set(decode.check_compatible(local, tp)) & SENDER_BRIDGES else None


def _verdict(receiver: FormatDescriptor, sender: FormatDescriptor, where: str,
             tp: tuple[int, int]) -> str | None:
    try:
        bridges = receiver.check_compatible(sender, tp)
    except FormatMismatchError as e:
        pages = ("" if receiver.page_size == sender.page_size else
                 f"; page_size: decode={receiver.page_size} prefill={sender.page_size} (re-paging alone "
                 f"would be bridged)")
        return Refusal("format_mismatch",
                       f"{where}: {e} (local = decode, peer = prefill){pages}")
    unsupported = [b.value for b in bridges if b not in APPLIED_BRIDGES | SENDER_BRIDGES]
    if unsupported:
        return Refusal("unsupported_bridge",
                       f"{where}: KV formats differ (decode fmt={receiver.fmt.value} page_size="
                       f"{receiver.page_size}, prefill fmt={sender.fmt.value} page_size={sender.page_size}); "
                       f"bridge(s) {unsupported} are not supported on the transfer path yet; use the "
                       f"same MEMHA_KV_FORMAT and --page-size on both servers")
    return None


def _parse(payload_of, value: object, what: str) -> FormatDescriptor | str:
    try:
        return FormatDescriptor.from_bytes(payload_of(value))
    except ValueError as e:  # the only error from_bytes and the payload helpers raise
        return Refusal("malformed",
                       f"malformed sglang-memha descriptor from {what}: {e}")


def check_layout_tag(secret: str | None, kv_layout: object, peer: str) -> str | None:
    """Decode side: None when the prefill's layout carries the right tag (or neither side has a
    secret), else the reason."""
    tagged = isinstance(kv_layout, str) and kv_layout.startswith(AUTH_LAYOUT_PREFIX)
    if not secret:
        return None if not tagged else Refusal(
            "auth", f"prefill at {peer} authenticates with a shared secret but this decode has none: set "
                    f"the same MEMHA_SHARED_SECRET on both servers")
    if not tagged:
        return Refusal("auth",
                       f"prefill at {peer} sent no authentication tag: it has no MEMHA_SHARED_SECRET (another "
                       f"deployment, or a misconfigured server); set the same secret on both servers")
    rest = kv_layout[len(AUTH_LAYOUT_PREFIX):]
    tag, sep, payload = rest[:_TAG_HEX], rest[_TAG_HEX:_TAG_HEX + 1], rest[_TAG_HEX + 1:]
    try:
        expect = _tag(secret, b"memha-layout", payload.encode())
        ok = sep == ":" and hmac.compare_digest(expect, tag)
    except (UnicodeEncodeError, TypeError):
        ok = False
    if not ok:
        return Refusal("auth",
                       f"prefill at {peer} sent a wrong authentication tag: its MEMHA_SHARED_SECRET differs "
                       f"(another deployment?); refusing its KV")
    return None


def check_prefill_peer(local: FormatDescriptor, kv_layout: str | None, peer: str,
                       secret: str | None = None, tp: tuple[int, int] = (1, 1),
                       local_stock: bool = False) -> str | None:
    """Decode side: judge the prefill's published ``kv_layout`` (any JSON value the bootstrap
    server returned: only a ``memha/1:`` / ``memha/1a:`` str is parsed, other strs and None are
    "missing"), its authentication tag first. ``tp``: (decode, prefill) attention TP sizes.
    ``local_stock``: this decode runs SGLang's own fp8 pool (``pool/stock_pool``): a prefill
    without a descriptor is plain SGLang PD (accepted, as without the plugin), and one with a
    descriptor must send pages this pool reads as they are (no bridge: same format, layer scales
    and page size)."""
    if kv_layout is None or (isinstance(kv_layout, str) and not kv_layout.startswith(
            (LAYOUT_PREFIX, AUTH_LAYOUT_PREFIX))):
        return None if local_stock and not secret else _missing("prefill", peer, local, "decode")
    reason = check_layout_tag(secret, kv_layout, peer)
    if reason is not None:
        return reason
    parsed = _parse(_layout_payload, kv_layout, f"prefill at {peer}")
    if isinstance(parsed, str):
        return parsed
    reason = _verdict(local, parsed, f"prefill at {peer} is incompatible", tp)
    if reason is None and local_stock and local.check_compatible(parsed, tp):
        return Refusal("unsupported_bridge",
                       f"prefill at {peer} sends fmt={parsed.fmt.value} page_size={parsed.page_size}, and this "
                       f"decode runs SGLang's own fp8 pool (fp8_e4m3_tensor, page_size={local.page_size}), which "
                       f"takes pages only as they are: start the prefill with MEMHA_KV_FORMAT=fp8_e4m3_tensor "
                       f"and the same --page-size, or give this decode MEMHA_KV_FORMAT")
    return reason


def check_decode_peer(local: FormatDescriptor, frame: bytes | None, peer: str,
                      tp: tuple[int, int] = (1, 1)) -> str | None:
    """Prefill side: judge a decode's registration frame (None: the decode sent none). ``tp``:
    (decode, prefill) attention TP sizes."""
    if frame is None:
        return _missing("decode", peer, local, "prefill")
    parsed = _parse(_frame_payload, frame, f"decode at {peer}")
    if isinstance(parsed, str):
        return parsed
    return _verdict(parsed, local, f"decode at {peer} is incompatible", tp)


__all__ = ["Bridge", "check_decode_peer", "check_layout_tag", "check_prefill_peer",
           "check_registration_tag", "encode_frame", "encode_layout", "encode_tag_frame", "find_frame"]
