"""Where a pool's bytes live (format v4): the one module that maps slots and pages to addresses.

A pool of ``L`` layers keeps, per layer and for K and V separately, two slot-indexed buffers::

    data  [num_slots, num_kv_heads, data_bytes_per_head]   uint8
    scale [num_slots, num_kv_heads, scale_bytes_per_head]  uint8  (absent when that is 0)

Slot ``s`` is token ``s % page_size`` of page ``s // page_size``. Data row ``(s, h)`` starts at
byte ``(s * H + h) * data_bytes_per_head`` of its data buffer, so with 16-byte aligned buffers
every data row starts on a 16-byte boundary when ``data_bytes_per_head`` is a multiple of 16
(head_dim a multiple of 32 for every format). Page ``p`` of a buffer is the byte range
``[p * item, (p + 1) * item)`` with ``item = page_size * H * bytes_per_head`` of that buffer.

The pool publishes its buffers (to SGLang's PD transfer and Mooncake) as *entries* in this order::

    [K data 0..L-1, K scale 0..L-1, V data 0..L-1, V scale 0..L-1]   (formats with scale rows)
    [K data 0..L-1, V data 0..L-1]                                   (bf16, fp8_e4m3_tensor)

so the first half is K and the second V (SGLang splits its MHA entry list that way), and entry
``i`` belongs to pool layer ``i % L``. A run of contiguous pages travels as one Mooncake slice
per entry. Why separate scale buffers rather than ``[page data | page scales]`` in one buffer:
a page-major page must be padded to 16 bytes, which at page size 1 and few KV heads per rank
breaks fp8's byte goal (3 heads x D = 64: 198 -> 208 B, 0.54 of bf16; 1 head x D = 128: 130 ->
144 B, 0.56), while separate buffers cost nothing at any page size; vLLM moved its fp8 scales
to separate caches for the same alignment reason (vLLM PR #56164: 6.3x slower with inline
260-byte slots).

Pools holding other KV heads of one model (a prefill and a decode with different attention TP
sizes) exchange, per token, the rows of the heads they share (``head_slice_blocks``): data and
scale rows are both per (token, head), so a head's slice is a slice of each buffer, each with its
own row bytes (``int4_kivi``'s K scale rows too: each head's block table is spread over that
head's rows). K and V buffers have the same row bytes except the scale rows of ``SIDE_FORMATS``
(``int4_kivi_g64``: K D/8, V D/16 bytes per (token, head)): every entry's bytes come from its own
side's ``RowLayout``. Pure arithmetic: no SGLang, no torch buffers.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sglang_memha.kvformat.spec import KVFormat, format_spec, row_bytes

ALIGN = 16  # bytes: the boundary every data row starts on (for data_bytes_per_head % 16 == 0)


class RowLayout:
    """Bytes of one (token, kv-head) row of ``side`` ("k" or "v") of a ``fmt`` pool: ``data_bytes``
    in the data buffer, ``scale_bytes`` in the scale buffer (0: no scale buffer). K and V rows are
    alike except in ``SIDE_FORMATS`` (``int4_kivi_g64``: K scale rows D/8 B, V's D/16 B)."""

    def __init__(self, fmt: KVFormat | str, head_dim: int, side: str = "k"):
        self.fmt = KVFormat.parse(fmt)
        spec = format_spec(self.fmt)
        self.head_dim, self.side = head_dim, side
        self.data_bytes, self.scale_bytes = row_bytes(self.fmt, side, head_dim)
        self.row_bytes = self.data_bytes + self.scale_bytes  # both buffers together
        self.has_layer_scale = spec.scale_scope == "layer"

    @property
    def has_scale_rows(self) -> bool:
        return self.scale_bytes > 0

    @property
    def aligned(self) -> bool:
        """Every data row starts on an ``ALIGN``-byte boundary (given an aligned buffer)."""
        return self.data_bytes % ALIGN == 0


@dataclass(frozen=True)
class Entry:
    """One published buffer: K or V, data or scale rows, of pool-local ``layer``."""
    side: str  # "k" | "v"
    kind: str  # "data" | "scale"
    layer: int


class PoolLayout:
    """Entries and page addresses of a pool of ``fmt`` (see the module docstring)."""

    def __init__(self, fmt: KVFormat | str, head_dim: int, num_kv_heads: int, num_layers: int,
                 page_size: int):
        self.rows = {side: RowLayout(fmt, head_dim, side) for side in "kv"}
        self.row = self.rows["k"]  # K's; V's differs only in scale bytes, for SIDE_FORMATS
        assert self.row.has_scale_rows == self.rows["v"].has_scale_rows
        self.fmt, self.heads, self.layers, self.page_size = self.row.fmt, num_kv_heads, num_layers, page_size
        kinds = ("data", "scale") if self.row.has_scale_rows else ("data",)
        self.entries = [Entry(side, kind, layer) for side in "kv" for kind in kinds for layer in range(num_layers)]

    @classmethod
    def of(cls, desc) -> PoolLayout:
        """The layout a ``FormatDescriptor`` describes."""
        return cls(desc.fmt, desc.head_dim, desc.num_kv_heads, desc.num_layers, desc.page_size)

    def head_bytes(self, entry: Entry) -> int:
        """Bytes of one (token, kv-head) row in ``entry``'s buffer."""
        row = self.rows[entry.side]
        return row.data_bytes if entry.kind == "data" else row.scale_bytes

    def token_bytes(self, entry: Entry) -> int:
        """Bytes one token occupies in ``entry``'s buffer."""
        return self.heads * self.head_bytes(entry)

    def token_lens(self) -> list[int]:
        return [self.token_bytes(e) for e in self.entries]

    def item_lens(self) -> list[int]:
        """Bytes of one page of each entry, in publication order (SGLang's ``kv_item_lens``)."""
        return [self.page_size * t for t in self.token_lens()]

    def split(self, values: list) -> dict[tuple[str, str], list]:
        """A per-entry list (pointers, lengths) -> ``{(side, kind): [per layer]}``."""
        if len(values) != len(self.entries):
            raise ValueError(f"{len(values)} buffers for a {self.fmt.value} pool of {self.layers} layers, "
                             f"expected {len(self.entries)} ({'K/V data and scale' if self.row.has_scale_rows else 'K/V data'})")
        out: dict[tuple[str, str], list] = {}
        for e, v in zip(self.entries, values):
            out.setdefault((e.side, e.kind), []).append(v)
        return out


def layer_of_entries(num_entries: int, num_layers: int) -> list[int]:
    """Pool-local layer of each published entry (both entry orders above: ``i % L``)."""
    if num_layers <= 0 or num_entries % (2 * num_layers):
        raise ValueError(f"{num_entries} KV buffers do not split into K and V of {num_layers} layers")
    return [i % num_layers for i in range(num_entries)]


def page_blocks(src_ptr: int, dst_ptr: int, item_len: int, runs: np.ndarray) -> list[tuple[int, int, int]]:
    """Mooncake blocks ``(src addr, dst addr, bytes)`` of one entry for page ``runs`` ([r, 3]
    int: first src page, first dst page, pages), both sides using the same page bytes."""
    return [(src_ptr + int(s) * item_len, dst_ptr + int(d) * item_len, int(n) * item_len) for s, d, n in runs]


def token_blocks(src_ptr: int, dst_ptr: int, token_bytes: int, runs: np.ndarray) -> list[tuple[int, int, int]]:
    """Mooncake blocks of one entry for token ``runs`` ([r, 3] int: first src slot or staged row,
    first dst slot, tokens): re-paging and send-time conversion address tokens, not pages."""
    return [(src_ptr + int(s) * token_bytes, dst_ptr + int(d) * token_bytes, int(c) * token_bytes)
            for s, d, c in runs]


def head_slice_blocks(src: PoolLayout, dst: PoolLayout, src_ptrs: list[int], dst_ptrs: list[int],
                      src_pages: np.ndarray, dst_pages: np.ndarray, src_head: int, dst_head: int,
                      num_heads: int) -> list[tuple[int, int, int]]:
    """Mooncake blocks ``(src addr, dst addr, bytes)`` that copy KV heads ``[src_head, src_head +
    num_heads)`` of pool ``src`` to heads ``[dst_head, dst_head + num_heads)`` of pool ``dst``,
    for every token of pages ``src_pages`` -> ``dst_pages`` ([n] int each) and every entry
    (``*_ptrs``: base addresses in publication order). The two pools hold different KV heads of
    one model (different attention TP sizes): same format, head_dim, layers and page size, other
    ``heads``. A token's rows of consecutive heads are contiguous in each buffer (``(s * H + h) *
    bytes_per_head``), so each (entry, token) is one block of ``num_heads`` rows, data and scale
    buffers each with their own row bytes."""
    if (src.fmt, src.row.head_dim, src.layers, src.page_size) != (dst.fmt, dst.row.head_dim, dst.layers,
                                                                  dst.page_size):
        raise ValueError(f"head slicing needs the same format, head_dim, layers and page size: "
                         f"{(src.fmt.value, src.row.head_dim, src.layers, src.page_size)} -> "
                         f"{(dst.fmt.value, dst.row.head_dim, dst.layers, dst.page_size)}")
    if not (0 <= src_head and src_head + num_heads <= src.heads and 0 <= dst_head
            and dst_head + num_heads <= dst.heads and num_heads > 0):
        raise ValueError(f"heads [{src_head}, {src_head + num_heads}) -> [{dst_head}, {dst_head + num_heads}) "
                         f"do not fit pools of {src.heads} -> {dst.heads} kv heads")
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
    src.split(src_ptrs), dst.split(dst_ptrs)  # one pointer per entry, or ValueError naming the counts
    slots = np.arange(src.page_size, dtype=np.int64)[None, :]
    src_slots = (np.asarray(src_pages, dtype=np.int64)[:, None] * src.page_size + slots).ravel()
    dst_slots = (np.asarray(dst_pages, dtype=np.int64)[:, None] * dst.page_size + slots).ravel()
    blocks: list[tuple[int, int, int]] = []
    for entry, sp, dp in zip(src.entries, src_ptrs, dst_ptrs):
        hb = src.head_bytes(entry)
        s_addr = sp + (src_slots * src.heads + src_head) * hb
        d_addr = dp + (dst_slots * dst.heads + dst_head) * hb
        blocks += zip(s_addr.tolist(), d_addr.tolist(), [num_heads * hb] * len(s_addr))
    return blocks


__all__ = ["ALIGN", "Entry", "PoolLayout", "RowLayout", "head_slice_blocks", "layer_of_entries", "page_blocks",
           "token_blocks"]
