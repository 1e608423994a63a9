"""What the bytes of a KV page look like: the format enum, per-format facts, page geometry.

One page of one layer holds ``page_size`` consecutive token slots of K (and, separately, of V).
Every format stores, per (token, kv-head), a fixed number of *data* bytes and a fixed number of
*scale* bytes, so a page is two dense blocks:

    data  [page_size, num_kv_heads, data_bytes_per_head]   uint8   (NHD, token-major)
    scale [page_size, num_kv_heads, scale_bytes_per_head]  uint8   (viewed as the scale dtype)

In a KV pool the scales live in a *companion* buffer indexed by the same slot as the data
(slot ``s`` -> data row ``s``, scale row ``s``), so page ``p`` of a layer is the byte range
``[p * data_bytes, (p + 1) * data_bytes)`` of the data buffer plus
``[p * scale_bytes, (p + 1) * scale_bytes)`` of the scale buffer. The data buffer of
``fp8_e4m3_tensor`` is therefore byte-identical to SGLang's ``--kv-cache-dtype fp8_e4m3`` pool.
Formats in ``SIDE_FORMATS`` (``int4_kivi``, ``int4_kivi_g64``) store K rows of one format and V
rows of another (``side_format``), so their K and V scale rows may differ in size; every figure
of a ``FormatSpec`` describes K's rows there. For a single contiguous wire/file form,
``PageGeometry`` also gives a *packed* page of one layer:
``[K data | V data | K scale | V scale]``, each segment starting at a multiple of ``PACK_ALIGN``
bytes (zero padding between). Byte order is little-endian everywhere.

``docs/kv_format.md`` specifies the bytes; ``tests/kvformat/test_doc_tables.py`` keeps that page
and ``FORMAT_SPECS`` in agreement.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

# Version of the byte format as a whole. Bump when any byte of any format changes meaning.
FORMAT_VERSION = 4
FORMAT_VERSION_HISTORY: tuple[tuple[int, str], ...] = (
    (1, "initial: bf16, fp8_e4m3 (fp32 scale per token-head), fp8_e4m3_tensor, "
        "fp8_e4m3fnuz (clamp 224), int8, int4_g32/int4_g64 (asymmetric, bf16 scale+min), bfp8"),
    (2, "fp8_e4m3 and fp8_e4m3fnuz: the per-token-head scale is one E8M0 byte e, scale = 2^(e - 127), "
        "k = e - 127 the smallest integer with amax <= C * 2^k (C = 448 fn, 224 fnuz), e clamped to "
        "[0, 254] (fn) / [1, 254] (fnuz; = the fn byte + 1), codes = RNE(x * 2^-k); replaces the fp32 "
        "amax / C (4 bytes). Other formats unchanged"),
    (3, "fp8_e4m3 and fp8_e4m3fnuz: the per-token-head scale is one bf16 s = max(bf16 rounded toward "
        "+inf of fp32(amax / C), S_MIN) (C = 448 fn, 224 fnuz; S_MIN = 2^-126 fn, 2^-125 fnuz), "
        "codes = RNE(fp32(x * fp32(1 / s))), x = fp8(code) * s; replaces v2's E8M0 byte (2 bytes per "
        "row instead of 1). Other formats unchanged. int4 encoders write a zero min_b / scale_b as +0 "
        "(before 2026-12 one could write -0; decoding is the same, so no version bump). int4_kivi added "
        "(a new name; no existing byte changes meaning, so no version bump; a v3 peer without it refuses "
        "the name)"),
    (4, "pool and wire layout: a layer's data rows and scale rows live in two buffers indexed by the "
        "same slot (data [slots, H, data_bytes_per_head], scale [slots, H, scale_bytes_per_head]), so "
        "every (token, head) data run starts on a 16-byte boundary for head_dim a multiple of 32; v3 "
        "interleaved [data | scale] per (token, head) in one buffer (130 B rows for fp8 at D = 128, "
        "2-byte aligned). The codes and scales of every format are unchanged; a v3 peer is refused "
        "because its pages hold the same bytes at other addresses. int4_kivi_g64 added (int4_kivi's K "
        "rows, int4_g64's V rows; a new name, no existing byte changes meaning, so no version bump; a "
        "v4 peer without it refuses the name)"),
)
# Versions this build reads (handshake accepts a peer whose version is in this set). v1 and v2 are
# refused: their fp8_e4m3 / fp8_e4m3fnuz scale rows are 4-byte fp32 (v1) / 1-byte E8M0 (v2), v3's
# are 2-byte bf16, so the same format name means other bytes. v3 is refused: its pages interleave
# scales with data, so a v4 reader would take scale bytes for codes.
SUPPORTED_VERSIONS: frozenset[int] = frozenset({4})

# Every packed-page segment starts at a multiple of this many bytes.
PACK_ALIGN = 16
# Inputs must be finite and |x| <= MAX_ABS_INPUT (keeps every scale computation overflow-free).
MAX_ABS_INPUT = 2.0**64


class KVFormat(str, enum.Enum):
    """How one K or V element is stored in a page. The value is the wire/CLI name."""

    BF16 = "bf16"
    FP8_E4M3 = "fp8_e4m3"
    FP8_E4M3_TENSOR = "fp8_e4m3_tensor"
    FP8_E4M3FNUZ = "fp8_e4m3fnuz"
    INT8 = "int8"
    INT4_G32 = "int4_g32"
    INT4_G64 = "int4_g64"
    BFP8 = "bfp8"
    INT4_KIVI = "int4_kivi"
    INT4_KIVI_G64 = "int4_kivi_g64"

    @classmethod
    def parse(cls, value: str | KVFormat) -> KVFormat:
        if isinstance(value, KVFormat):
            return value
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(f.value for f in cls)
            raise ValueError(f"kv format {value!r} is not supported; expected one of: {names}") from None

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class FormatSpec:
    """Static facts of one format (the rows of the table in docs/kv_format.md). For a format in
    ``SIDE_FORMATS`` the per-row figures (bits, scales, bytes) are K's; V's are those of
    ``format_spec(side_format(fmt, "v"))``. ``head_dim_multiple`` holds for both sides."""

    fmt: KVFormat
    bits: int  # stored bits per K/V element
    scale_scope: str  # "none" | "layer" | "token_head" | "group" | "channel_block"
    # group: elements sharing one scale entry along head_dim; channel_block: tokens per K block
    # (each K channel has one entry per block; a block's D entries are spread over its rows)
    group_size: int | None
    scale_dtype: str  # "none" | "fp32" | "bf16" | "bf16x2" (scale, min) | "e8m0"
    scale_entry_bytes: int  # bytes of one scale entry
    head_dim_multiple: int  # head_dim must be a multiple of this
    dequant: str  # the dequantization formula, also in the doc

    @property
    def token_local(self) -> bool:
        """Every (token, kv-head) row is coded from that row alone, so any set of slots can be
        written, converted or re-paged on its own. ``channel_block`` formats code K per block of
        tokens (KIVI): their pools write blocks in position order and move whole blocks."""
        return self.scale_scope != "channel_block"

    def check_head_dim(self, head_dim: int) -> None:
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % self.head_dim_multiple:
            raise ValueError(
                f"head_dim={head_dim!r} is not valid for {self.fmt.value}: expected a positive "
                f"multiple of {self.head_dim_multiple}"
            )

    def data_bytes_per_head(self, head_dim: int) -> int:
        """Data bytes of one (token, kv-head) row."""
        self.check_head_dim(head_dim)
        return head_dim * self.bits // 8

    def scales_per_head(self, head_dim: int) -> int:
        """Scale entries of one (token, kv-head) row (0 for bf16 and per-layer scales)."""
        self.check_head_dim(head_dim)
        if self.scale_scope == "token_head":
            return 1
        if self.scale_scope in ("group", "channel_block"):
            return head_dim // self.group_size
        return 0

    def scale_bytes_per_head(self, head_dim: int) -> int:
        return self.scales_per_head(head_dim) * self.scale_entry_bytes


FORMAT_SPECS: dict[KVFormat, FormatSpec] = {
    s.fmt: s
    for s in (
        FormatSpec(KVFormat.BF16, 16, "none", None, "none", 0, 1, "x = bf16(data)"),
        FormatSpec(KVFormat.FP8_E4M3, 8, "token_head", None, "bf16", 2, 1, "x = e4m3fn(data) * scale"),
        FormatSpec(KVFormat.FP8_E4M3_TENSOR, 8, "layer", None, "fp32", 4, 1, "x = e4m3fn(data) * layer_scale"),
        FormatSpec(KVFormat.FP8_E4M3FNUZ, 8, "token_head", None, "bf16", 2, 1, "x = e4m3fnuz(data) * scale"),
        FormatSpec(KVFormat.INT8, 8, "token_head", None, "fp32", 4, 1, "x = int8(data) * scale"),
        FormatSpec(KVFormat.INT4_G32, 4, "group", 32, "bf16x2", 4, 32, "x = uint4(data) * scale + min"),
        FormatSpec(KVFormat.INT4_G64, 4, "group", 64, "bf16x2", 4, 64, "x = uint4(data) * scale + min"),
        FormatSpec(KVFormat.BFP8, 8, "group", 16, "e8m0", 1, 16, "x = sign * mag7 * 2^(exp - 133)"),
        FormatSpec(KVFormat.INT4_KIVI, 4, "channel_block", 32, "bf16x2", 4, 32,
                   "K: x = uint4(data) * scale[c] + min[c] of its 32-token block; V: as int4_g32"),
        FormatSpec(KVFormat.INT4_KIVI_G64, 4, "channel_block", 32, "bf16x2", 4, 64,
                   "K: as int4_kivi; V: as int4_g64"),
    )
}
# Formats whose K rows and V rows are those of two formats: fmt -> (K's format, V's format). K is
# int4_kivi's per-channel 32-token blocks; V a per-token int4 format. The others store K and V alike.
SIDE_FORMATS: dict[KVFormat, tuple[KVFormat, KVFormat]] = {
    KVFormat.INT4_KIVI: (KVFormat.INT4_KIVI, KVFormat.INT4_G32),
    KVFormat.INT4_KIVI_G64: (KVFormat.INT4_KIVI, KVFormat.INT4_G64),
}
# Formats whose rows are coded one (token, head) at a time (see ``FormatSpec.token_local``).
TOKEN_LOCAL_FORMATS: tuple[KVFormat, ...] = tuple(f for f, s in FORMAT_SPECS.items() if s.token_local)


def format_spec(fmt: str | KVFormat) -> FormatSpec:
    return FORMAT_SPECS[KVFormat.parse(fmt)]


def side_format(fmt: str | KVFormat, side: str) -> KVFormat:
    """The format whose rows ``side`` ("k" or "v") of a ``fmt`` pool holds: ``fmt`` itself, except
    for ``SIDE_FORMATS`` (``int4_kivi_g64``'s V -> ``int4_g64``)."""
    fmt = KVFormat.parse(fmt)
    if side not in ("k", "v"):
        raise ValueError(f"side={side!r}: expected 'k' or 'v'")
    return SIDE_FORMATS.get(fmt, (fmt, fmt))[side == "v"]


def row_bytes(fmt: str | KVFormat, side: str, head_dim: int) -> tuple[int, int]:
    """(data bytes, scale bytes) of one (token, kv-head) row of ``side`` in a ``fmt`` pool."""
    format_spec(fmt).check_head_dim(head_dim)
    spec = format_spec(side_format(fmt, side))
    return spec.data_bytes_per_head(head_dim), spec.scale_bytes_per_head(head_dim)


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} is not valid: expected a positive int")
    return value


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def kv_bytes_per_token(fmt: str | KVFormat, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of K + V of ONE layer for one token, per-token scales included.

    Per-layer scales (``fp8_e4m3_tensor``: 8 bytes per layer) are not per token and not counted.
    """
    _positive_int("num_kv_heads", num_kv_heads)
    return num_kv_heads * sum(sum(row_bytes(fmt, side, head_dim)) for side in "kv")


@dataclass(frozen=True)
class PageGeometry:
    """Byte geometry of one page of one layer (sizes are for K alone; V's are the same, except the
    scale rows of a ``SIDE_FORMATS`` format: ``v_scale_bytes_per_head`` / ``v_scale_bytes``)."""

    fmt: KVFormat
    page_size: int
    num_kv_heads: int
    head_dim: int
    data_bytes_per_head: int  # per (token, kv-head)
    scale_bytes_per_head: int  # per (token, kv-head); 0 when there are no per-token scales
    data_bytes: int  # page_size * num_kv_heads * data_bytes_per_head
    scale_bytes: int  # page_size * num_kv_heads * scale_bytes_per_head
    layer_scale_bytes: int  # per layer, K and V together (fp8_e4m3_tensor: 8), sent once
    v_scale_bytes_per_head: int  # V's scale_bytes_per_head (int4_kivi_g64: int4_g64's, D/16)
    v_scale_bytes: int  # page_size * num_kv_heads * v_scale_bytes_per_head
    # packed page [K data | V data | K scale | V scale], each segment aligned to PACK_ALIGN
    k_data_offset: int
    v_data_offset: int
    k_scale_offset: int
    v_scale_offset: int
    packed_bytes: int

    @property
    def scale_dtype(self) -> str:
        return FORMAT_SPECS[self.fmt].scale_dtype


def page_geometry(fmt: str | KVFormat, page_size: int, num_kv_heads: int, head_dim: int) -> PageGeometry:
    spec = format_spec(fmt)
    _positive_int("page_size", page_size)
    _positive_int("num_kv_heads", num_kv_heads)
    dph, sph = row_bytes(spec.fmt, "k", head_dim)
    v_dph, v_sph = row_bytes(spec.fmt, "v", head_dim)
    assert v_dph == dph, f"{spec.fmt.value}: K and V data rows differ"
    data = page_size * num_kv_heads * dph
    scale = page_size * num_kv_heads * sph
    v_scale_len = page_size * num_kv_heads * v_sph
    v_data = _align(data, PACK_ALIGN)
    k_scale = v_data + _align(data, PACK_ALIGN)
    v_scale = k_scale + _align(scale, PACK_ALIGN)
    packed = v_scale + _align(v_scale_len, PACK_ALIGN)
    return PageGeometry(
        fmt=spec.fmt, page_size=page_size, num_kv_heads=num_kv_heads, head_dim=head_dim,
        data_bytes_per_head=dph, scale_bytes_per_head=sph, data_bytes=data, scale_bytes=scale,
        layer_scale_bytes=8 if spec.scale_scope == "layer" else 0,
        v_scale_bytes_per_head=v_sph, v_scale_bytes=v_scale_len,
        k_data_offset=0, v_data_offset=v_data, k_scale_offset=k_scale, v_scale_offset=v_scale,
        packed_bytes=packed,
    )
