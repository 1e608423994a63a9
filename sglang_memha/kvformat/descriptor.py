"""Compatibility descriptor exchanged at the PD handshake.

Each side builds a ``FormatDescriptor`` of the KV it writes (prefill) or stores (decode) and sends
``to_bytes()`` to the other. The receiver (decode) calls ``local.check_compatible(peer)``:

* identical where it matters -> ``[]`` (no bridge, bytes are used as they arrive);
* a difference one side can convert -> the list of ``Bridge`` steps; ``SENDER_BRIDGES`` are
  applied by the prefill while it sends (the wire then carries the decode's rows, in its pages),
  the others by the decode on arrival:
    - ``FNUZ_TO_FN`` / ``FN_TO_FNUZ`` (decode): fp8 e4m3fnuz <-> e4m3fn, bytes kept (0x80 -> 0x00
      one way), per-row bf16 scales halved / doubled (``fp8.fnuz_to_fn`` / ``fp8.fn_to_fnuz``),
      value-exact;
    - ``LAYER_TO_TOKEN_SCALE`` (prefill): a stock SGLang fp8 pool (``fp8_e4m3_tensor``) into our
      ``fp8_e4m3``: bytes kept, every (token, head) scale set to the layer scale
      (``fp8.layer_to_token_scale``); value-exact, and possible only for a layer scale that is a
      bf16 value (SGLang's default 1.0) -- the descriptor does not carry layer scales, so any other
      one is refused when the bridge is applied;
    - ``ENCODE_ON_SEND`` (prefill): a ``bf16`` prefill pool (SGLang's own, or ours) into any
      other format: the prefill quantizes the pages it sends with the decode's codec (and the
      decode's K transform, when the prefill has none): phase-wise quantization done at send
      time; the bytes equal what a prefill pool of the decode's format would hold for the same
      bf16 K/V;
    - ``REQUANTIZE_ON_SEND`` (prefill): any other pair of token-local formats (e.g. an
      ``fp8_e4m3fnuz`` prefill pool into an ``int8`` or ``int4_g64`` decode): the prefill
      dequantizes the rows it sends (fp32, exact for every format) and quantizes them with the
      decode's codec, as ``ENCODE_ON_SEND`` does; the bytes equal what a pool of the decode's
      format holds when fed those dequantized rows. Lossy on top of the prefill's own
      quantization (the values are rounded twice), so the exact bridges above take precedence;
    - ``REPAGE`` (prefill): different page sizes; every format is token-local (a row of one
      (token, head) holds its data and scale), so the prefill writes each token's rows to the
      decode slot that token has in the decode's pages (``sglang_ext.transfer.repage``); combines with a
      format bridge;
* different attention TP sizes (``check_compatible(peer, tp=...)``): no bridge; ``num_kv_heads``
  is per rank, so it is compared as heads x TP, and the prefill sends each decode rank the rows
  of the heads they share (``layout.head_slice_blocks``); not combined with a sender bridge;
* anything else -> ``FormatMismatchError`` naming every differing field with both values: a
  block-coded format (``int4_kivi``, ``int4_kivi_g64``) on either side with another format (the
  two with each other too: their V rows differ) or page size, a K transform on the sender that
  the receiver lacks, and every other field (heads, head_dim, layers, model, K offset, layout,
  version).
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import MISSING, asdict, dataclass, fields

from sglang_memha.kvformat import k_offset as _k_offset
from sglang_memha.kvformat.spec import FORMAT_VERSION, SUPPORTED_VERSIONS, KVFormat, format_spec
from sglang_memha.kvformat.transforms import K_TRANSFORMS

LAYOUTS = ("NHD",)


class FormatMismatchError(ValueError):
    """Raised at handshake; ``mismatches`` is a list of (field, local value, peer value)."""

    def __init__(self, mismatches: list[tuple[str, object, object]]):
        self.mismatches = mismatches
        body = "; ".join(f"{f}: local={a!r} peer={b!r}" for f, a, b in mismatches)
        hint = ""
        if any(f == "version" for f, _, _ in mismatches):
            hint = (f" (KV byte format versions differ; this build reads {sorted(SUPPORTED_VERSIONS)}: "
                    f"run the same sglang-memha release on prefill and decode)")
        if any(f == "k_offset" for f, _, _ in mismatches):
            hint += (" (K offsets differ: set MEMHA_K_OFFSET to the same calibration file on both "
                     "servers, or on neither)")
        super().__init__(f"KV format mismatch with peer (not bridgeable): {body}{hint}")


def _parse_kv_scales(value, fmt: KVFormat, num_layers) -> tuple[tuple[float, float], ...] | None:
    """``kv_scales`` as a tuple of (K, V) float pairs, one per layer; ``ValueError`` naming the fault."""
    if value is None:
        return None
    if fmt != KVFormat.FP8_E4M3_TENSOR:
        raise ValueError(f"FormatDescriptor.kv_scales is stated for fmt={fmt.value}: expected it only for "
                         f"fp8_e4m3_tensor (one scale per layer; the other formats carry theirs in the pages)")
    if not isinstance(value, (list, tuple)) or len(value) != num_layers:
        raise ValueError(f"FormatDescriptor.kv_scales has {len(value) if isinstance(value, (list, tuple)) else value!r} "
                         f"entries: expected one [k_scale, v_scale] pair per layer ({num_layers})")
    out = []
    for i, pair in enumerate(value):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in pair)
        if not ok:
            raise ValueError(f"FormatDescriptor.kv_scales[{i}]={pair!r}: expected [k_scale, v_scale], two positive "
                             f"finite numbers")
        out.append((float(pair[0]), float(pair[1])))
    return tuple(out)


def _kv_scales_mismatch(local, peer) -> tuple[str, object, object]:
    """The mismatch entry for two fp8_e4m3_tensor descriptors whose layer scales differ."""
    what = ("kv_scales (fp8_e4m3_tensor pages hold K / k_scale and V / v_scale of their layer: both servers "
            "need the same checkpoint scales, or SGLang's default 1.0 on both")
    if local is None or peer is None:
        return (what + "; a side that states none runs another sglang-memha: run the same release on both)",
                "stated" if local else None, "stated" if peer else None)
    diff = [i for i, (a, b) in enumerate(zip(local, peer)) if a != b]
    shown = ", ".join(f"layer {i}: {local[i]} vs {peer[i]}" for i in diff[:3]) + (" ..." if len(diff) > 3 else "")
    return (f"{what}; (k, v) differ in {len(diff)} layer(s): {shown})", local[diff[0]], peer[diff[0]])


class Bridge(str, enum.Enum):
    FNUZ_TO_FN = "fnuz_to_fn"
    FN_TO_FNUZ = "fn_to_fnuz"
    LAYER_TO_TOKEN_SCALE = "layer_to_token_scale"
    ENCODE_ON_SEND = "encode_on_send"
    REQUANTIZE_ON_SEND = "requantize_on_send"
    REPAGE = "repage"


# Bridges the sender (prefill) applies while sending; the rest are the receiver's.
SENDER_BRIDGES = frozenset({Bridge.LAYER_TO_TOKEN_SCALE, Bridge.ENCODE_ON_SEND, Bridge.REQUANTIZE_ON_SEND,
                            Bridge.REPAGE})


# (peer format, local format) -> bridge applied by the local (receiving) side
_FORMAT_BRIDGES = {
    (KVFormat.FP8_E4M3FNUZ, KVFormat.FP8_E4M3): Bridge.FNUZ_TO_FN,
    (KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ): Bridge.FN_TO_FNUZ,
    (KVFormat.FP8_E4M3_TENSOR, KVFormat.FP8_E4M3): Bridge.LAYER_TO_TOKEN_SCALE,
}


@dataclass(frozen=True)
class FormatDescriptor:
    fmt: KVFormat
    page_size: int
    num_kv_heads: int  # per rank (after TP sharding)
    head_dim: int
    num_layers: int
    model_id: str  # e.g. "Qwen/Qwen3-8B" plus a config hash; must match exactly
    k_transform: str = "none"  # transforms.K_TRANSFORMS
    k_offset: str = "none"  # "none" or k_offset.digest() of the MEMHA_K_OFFSET file; must match exactly
    layout: str = "NHD"
    version: int = FORMAT_VERSION
    # fp8_e4m3_tensor only: the (K, V) scale of each layer the pool divides by (None: not stated;
    # left out of to_dict then, so every other descriptor's bytes are unchanged). Must match.
    kv_scales: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fmt", KVFormat.parse(self.fmt))
        for name in ("page_size", "num_kv_heads", "num_layers", "version"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"FormatDescriptor.{name}={v!r}: expected a positive int")
        if isinstance(self.head_dim, bool):  # check_head_dim takes True for an int 1
            raise ValueError(f"FormatDescriptor.head_dim={self.head_dim!r}: expected a positive int")
        format_spec(self.fmt).check_head_dim(self.head_dim)
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"FormatDescriptor.model_id={self.model_id!r}: expected a non-empty str")
        if self.k_transform not in K_TRANSFORMS:
            raise ValueError(f"FormatDescriptor.k_transform={self.k_transform!r}: expected one of {K_TRANSFORMS}")
        if not _k_offset.is_digest(self.k_offset):
            raise ValueError(f"FormatDescriptor.k_offset={self.k_offset!r}: expected 'none' or 'sha256:<16 hex>'")
        if self.layout not in LAYOUTS:
            raise ValueError(f"FormatDescriptor.layout={self.layout!r}: expected one of {LAYOUTS}")
        object.__setattr__(self, "kv_scales", _parse_kv_scales(self.kv_scales, self.fmt, self.num_layers))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fmt"] = self.fmt.value
        if self.kv_scales is None:
            del d["kv_scales"]
        else:
            d["kv_scales"] = [list(p) for p in self.kv_scales]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FormatDescriptor:
        """Parse a peer's ``to_dict()``. Any malformed input (not a dict, unknown or missing
        fields, a wrong type or value) raises ``ValueError`` naming the field."""
        if not isinstance(d, dict):
            raise ValueError(f"FormatDescriptor must be a dict (JSON object) of its fields, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted((k for k in d if k not in names), key=repr)
        if unknown:
            raise ValueError(f"FormatDescriptor fields {unknown} are unknown; expected a subset of {sorted(names)}")
        required = {f.name for f in fields(cls) if f.default is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"FormatDescriptor fields {missing} are missing; expected all of {sorted(required)} "
                             f"(every sglang-memha sends them: run the same sglang-memha on both servers)")
        return cls(**d)

    def to_bytes(self) -> bytes:
        """Canonical JSON (sorted keys, no spaces), UTF-8."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> FormatDescriptor:
        """Parse a peer's ``to_bytes()``. Any malformed input raises ``ValueError`` (see
        ``from_dict``); tests/quant/test_handshake_fuzz.py holds it to that."""
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise ValueError(f"FormatDescriptor bytes must be bytes, got {type(raw).__name__}")
        try:
            d = json.loads(bytes(raw).decode())
        except ValueError as e:  # UnicodeDecodeError, JSONDecodeError, int over the digit limit
            raise ValueError(f"FormatDescriptor bytes are not UTF-8 JSON: {e}") from None
        except RecursionError:
            raise ValueError("FormatDescriptor bytes are not a descriptor: JSON nested too deeply "
                             "(a descriptor is one flat object)") from None
        if not isinstance(d, dict):
            raise ValueError(f"FormatDescriptor JSON must be an object, got {type(d).__name__}")
        return cls.from_dict(d)

    def check_compatible(self, peer: FormatDescriptor, tp: tuple[int, int] = (1, 1)) -> list[Bridge]:
        """Called by the receiving side with the sender's descriptor; see the module docstring.
        ``tp``: (this side's, the peer's) attention tensor-parallel size. Where they differ,
        ``num_kv_heads`` (per rank) is compared as heads x TP (the model's KV heads: each rank's
        rows are sliced or merged by head on send, ``layout.head_slice_blocks``), and a send-time
        bridge (``SENDER_BRIDGES``) is refused with it; KV heads replicated over ranks (fewer heads
        than ranks) never give equal products, so they are refused too."""
        local_tp, peer_tp = tp
        for v in tp:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"check_compatible tp={tp!r}: expected two positive ints")
        bad: list[tuple[str, object, object]] = []
        bridges: list[Bridge] = []
        if peer.version not in SUPPORTED_VERSIONS or self.version not in SUPPORTED_VERSIONS:
            bad.append(("version", self.version, peer.version))
        # Block-coded formats (int4_kivi, int4_kivi_g64) move whole K blocks as they are: no row
        # conversion, no re-paging (both rewrite rows one token at a time).
        block_coded = not (format_spec(self.fmt).token_local and format_spec(peer.fmt).token_local)
        if peer.fmt != self.fmt:
            bridge = _FORMAT_BRIDGES.get((peer.fmt, self.fmt))
            if bridge is None and not block_coded:
                bridge = Bridge.ENCODE_ON_SEND if peer.fmt == KVFormat.BF16 else Bridge.REQUANTIZE_ON_SEND
            if bridge is None:
                bad.append(("fmt", self.fmt.value, peer.fmt.value))
            else:
                bridges.append(bridge)
        if block_coded and peer.page_size != self.page_size:
            coded = next(f for f in (self.fmt, peer.fmt) if not format_spec(f).token_local)
            bad.append((f"page_size ({coded.value} pages are not re-paged)", self.page_size, peer.page_size))
        # Encoding on send applies the receiver's K transform to untransformed (dequantized) rows.
        transform_applied = (bool({Bridge.ENCODE_ON_SEND, Bridge.REQUANTIZE_ON_SEND} & set(bridges))
                             and peer.k_transform == "none")
        # k_offset is never bridged: both pools hold K - c, with the same c (no send-time re-offset).
        for name in ("num_kv_heads", "head_dim", "num_layers", "model_id", "k_transform", "k_offset", "layout"):
            if name == "k_transform" and transform_applied:
                continue
            a, b = getattr(self, name), getattr(peer, name)
            if name == "num_kv_heads" and local_tp != peer_tp:
                if a * local_tp != b * peer_tp:
                    bad.append(("num_kv_heads x attention TP (the model's KV heads differ, or KV heads "
                                "replicated over TP ranks, which are not head-sliced: use the same "
                                "--tp-size on both servers)", f"{a} heads x TP {local_tp}",
                                f"{b} heads x TP {peer_tp}"))
            elif a != b:
                bad.append((name, a, b))
        if self.fmt == peer.fmt == KVFormat.FP8_E4M3_TENSOR and self.kv_scales != peer.kv_scales:
            bad.append(_kv_scales_mismatch(self.kv_scales, peer.kv_scales))
        calibrated = [i for i, p in enumerate(self.kv_scales or ()) if p != (1.0, 1.0)]
        if calibrated and {Bridge.ENCODE_ON_SEND, Bridge.REQUANTIZE_ON_SEND} & set(bridges):
            bad.append(("kv_scales (the prefill quantizes fp8_e4m3_tensor pages with scale 1.0 on send; this pool "
                        "divides by its checkpoint's scales: use the same format on both servers)",
                        f"layer {calibrated[0]}: {self.kv_scales[calibrated[0]]}", "1.0"))
        if peer.page_size != self.page_size:
            bridges.append(Bridge.REPAGE)
        sent = [b.value for b in bridges if b in SENDER_BRIDGES]
        if local_tp != peer_tp and sent:
            bad.append((f"attention TP (head slicing is not combined with the send-time bridge(s) {sent}: "
                        f"use the same format and page size on both servers, or the same --tp-size)",
                        local_tp, peer_tp))
        if bad:
            raise FormatMismatchError(bad)
        return bridges
