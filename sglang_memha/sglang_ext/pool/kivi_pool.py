"""K rows of an ``int4_kivi`` (or ``int4_kivi_g64``: same K) pool: 32-token blocks coded per channel,
open blocks kept in bf16.

``int4_kivi`` codes K per (32-token block, head, channel) (``kvformat/kivi.py``), so a block's
codes depend on all of its rows. SGLang writes a page's slots in position order (prefill chunks,
then one decode token per step), so at any time each request has at most one *open* block: the
one holding its newest token. ``OpenBlocks`` handles every K write and read of such a pool:

* a write that covers a whole block (prefill) codes it at once;
* any other write puts the new values into the block's bf16 *shadow* (KIVI's full-precision
  residual), then re-codes the whole block from the shadow with the stats of its written rows
  (``quantize_blocks``) and stores the rows in the pool. So the pool rows are a valid coded
  block at every moment: a send (whole-request or per layer, any page), a CPU retraction copy or
  a checksum reads them like any other format's rows and needs no hook here;
* a read takes rows of blocks written in this forward from the shadow (exact, as KIVI reads its
  residual) and every other row through its block's table (gathered from the block's 32 rows).

The shadows are a cache, not state: a block whose shadow is missing or stale (rows written by
someone else since: a Mooncake transfer landing on the decode, ``load_cpu_copy``, a new owner of
the page) is restored from its coded rows before the write, which rounds its earlier rows once
more (at most 31 tokens per request, e.g. the prompt's last partial block on the decode). A
shadow is judged stale when the block's rows differ from what this class last wrote there, so
no allocator hook is needed; the least recently written shadows are reused when all are taken,
and the table grows (with a log line) when more blocks are open at once than it holds.

Shapes: per layer, ``k_data`` and ``k_scale`` are the pool's ``[slots, H, D/2]`` code rows and
``[slots, H, D/8]`` scale rows (uint8, format v4's separate buffers); values are ``[n, H, D]``;
shadows ``[S, 32, H, D]`` in the pool's dtype. Called from ``MemhaQuantKVPool.set_kv_buffer`` / ``QuantKVView`` on the forward's thread;
nothing blocks.
"""
from __future__ import annotations

import logging

import torch

from sglang_memha.kvformat.kivi import BLOCK, Int4KiviKCodec

logger = logging.getLogger("sglang_memha")


class OpenBlocks:
    # the shadow table: per-layer tensors have the capacity on dim 1, the others on dim 0
    _TABLE = ("vals", "coded", "fill", "fresh", "block_of", "stamp")

    def __init__(self, codec: Int4KiviKCodec, layout, num_layers: int, num_slots: int, head_num: int,
                 dtype: torch.dtype, device, capacity: int = 32):
        """``layout``: the pool's K ``RowLayout`` (code and scale bytes of an ``int4_kivi`` K row)."""
        self.codec, self.layout = codec, layout
        self.layers, self.h, self.d = num_layers, head_num, layout.head_dim
        self.dtype, self.device = dtype, device
        self.slot_of = torch.full(((num_slots + BLOCK - 1) // BLOCK,), -1, dtype=torch.long, device=device)
        self._alloc(capacity)
        self.clock = 0

    def _alloc(self, cap: int) -> None:
        l, h, d, kw = self.layers, self.h, self.d, {"device": self.device}
        self.vals = torch.zeros(l, cap, BLOCK, h, d, dtype=self.dtype, **kw)
        # as last written: code bytes then scale bytes of each row
        self.coded = torch.zeros(l, cap, BLOCK, h, self.layout.row_bytes, dtype=torch.uint8, **kw)
        self.fill = torch.zeros(l, cap, dtype=torch.long, **kw)
        # per layer: shadow slots written in the current forward (reads take their rows from the shadow)
        self.fresh = torch.zeros(l, cap, dtype=torch.bool, **kw)
        self.block_of = torch.full((cap,), -1, dtype=torch.long, **kw)
        self.stamp = torch.full((cap,), -1, dtype=torch.long, **kw)

    @property
    def capacity(self) -> int:
        return self.block_of.shape[0]

    def _grow(self, need: int) -> None:
        n = self.capacity
        cap = max(2 * n, n + need)
        logger.warning("sglang-memha int4_kivi: %d K blocks open at once; shadow table grows to %d blocks "
                       "(%.1f MiB)", n + need, cap, cap * self.layers * BLOCK * self.h
                       * (self.d * self.vals.element_size() + self.layout.row_bytes) / 2**20)
        old = {name: getattr(self, name) for name in self._TABLE}
        self._alloc(cap)
        for name, o in old.items():
            getattr(self, name).narrow(0 if o.dim() == 1 else 1, 0, n).copy_(o)

    def _slots_for(self, blocks: torch.Tensor) -> torch.Tensor:
        """Shadow slot of each block in ``blocks`` [m] (distinct), assigning free or least
        recently written ones (never one of ``blocks``'s own) to those without."""
        s = self.slot_of[blocks]
        missing = s < 0
        if bool(missing.any()):
            k = int(missing.sum())
            stamp = self.stamp.clone()
            stamp[s[~missing]] = torch.iinfo(torch.long).max  # in use by this write
            avail = int((stamp < self.clock).sum())
            if avail < k:
                self._grow(k - avail)
                stamp = torch.cat([stamp, torch.full((self.capacity - stamp.shape[0],), -1, dtype=torch.long,
                                                     device=self.device)])
            take = torch.topk(-stamp, k).indices  # oldest first; free slots have stamp -1
            old = self.block_of[take]
            self.slot_of[old[old >= 0]] = -1
            self.block_of[take] = blocks[missing]
            self.fill[:, take] = 0  # a reused slot describes nothing yet
            self.slot_of[blocks[missing]] = take
            s = self.slot_of[blocks]
        self.stamp[s] = self.clock
        return s

    # ---- write -----------------------------------------------------------------------------
    def write(self, layer: int, x: torch.Tensor, loc: torch.Tensor, k_data: torch.Tensor,
              k_scale: torch.Tensor) -> None:
        """Store K values ``x`` [n, H, D] at slots ``loc`` [n] of layer ``layer``'s rows.
        Slots of one block must be consecutive positions (SGLang's order); ValueError otherwise."""
        self.fresh[layer] = False
        if layer == 0:
            self.clock += 1
        if loc.numel() == 0:
            return
        loc, order = torch.sort(loc.long())
        x = x[order]
        blk, off = loc // BLOCK, loc % BLOCK
        ub, inv, cnt = torch.unique_consecutive(blk, return_inverse=True, return_counts=True)
        first = torch.cumsum(cnt, 0) - cnt
        start = off[first]
        if not torch.equal(off, start[inv] + torch.arange(loc.numel(), device=loc.device) - first[inv]):
            raise ValueError(
                f"int4_kivi pool: slots {loc.tolist()[:64]} do not fill their {BLOCK}-token K blocks in "
                f"position order (speculative or out-of-order writes are not supported with int4_kivi)")
        end = start + cnt
        whole = (start == 0) & (cnt == BLOCK)
        if bool(whole.all()):  # a prefill of whole blocks: no shadow involved
            self.codec.quantize_into(x, loc, k_data, k_scale)
            return
        if bool(whole.any()):
            rows = whole[inv]
            self.codec.quantize_into(x[rows], loc[rows], k_data, k_scale)
        part = ~whole
        pb, ps, pe = ub[part], start[part], end[part]
        s = self._slots_for(pb)
        rows_of = pb[:, None] * BLOCK + torch.arange(BLOCK, device=pb.device)  # [m, 32]
        current = torch.cat([k_data[rows_of], k_scale[rows_of]], dim=-1)  # [m, 32, H, R]
        same = (current == self.coded[layer, s]).flatten(1).all(1)
        restore = ((self.fill[layer, s] != ps) | ~same) & (ps > 0)
        if bool(restore.any()):  # earlier rows written by someone else: decode them once
            self.vals[layer, s[restore]] = self._decode(current[restore], self.dtype)
        el = part[inv]  # the elements of partial blocks
        group = (torch.cumsum(part.long(), 0) - 1)[inv[el]]
        self.vals[layer, s[group], off[el]] = x[el].to(self.dtype)
        self.fill[layer, s] = pe
        data, scales = self.codec.quantize_blocks(self.vals[layer, s], pe)
        new = torch.cat([data, self.codec.scale_bytes(scales)], dim=-1).reshape(current.shape)
        flat, at = new.reshape(-1, self.h, self.layout.row_bytes), rows_of.reshape(-1)
        k_data[at], k_scale[at] = flat[..., :self.layout.data_bytes], flat[..., self.layout.data_bytes:]
        self.coded[layer, s] = new
        self.fresh[layer, s] = pe < BLOCK  # a block completed here is read through its codes, as KIVI does

    def _decode(self, rows: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """Whole blocks of rows [m, 32, H, code bytes + scale bytes] -> K [m, 32, H, D] through
        their tables."""
        flat = rows.reshape(-1, self.h, self.layout.row_bytes)
        data, raw = flat[..., :self.layout.data_bytes], flat[..., self.layout.data_bytes:]
        x = self.codec.dequantize(data.contiguous(), self.codec.scales_from_bytes(raw.contiguous()), out_dtype)
        return x.reshape(-1, BLOCK, self.h, self.d)

    # ---- read ------------------------------------------------------------------------------
    def read(self, layer: int, slots: torch.Tensor, k_data: torch.Tensor, k_scale: torch.Tensor,
             out_dtype: torch.dtype, residual: bool = True) -> torch.Tensor:
        """K of ``slots`` [n] -> [n, H, D] in ``out_dtype`` (before any inverse K transform).
        ``residual=False`` reads every row through its codes (rows that just arrived)."""
        slots = torch.as_tensor(slots, device=k_data.device).long().reshape(-1)
        blk, off = slots // BLOCK, slots % BLOCK
        ub, inv = torch.unique(blk, return_inverse=True)
        rows = ub[:, None] * BLOCK + torch.arange(BLOCK, device=ub.device)
        out = self._decode(torch.cat([k_data[rows], k_scale[rows]], dim=-1), out_dtype)[inv, off]
        s = self.slot_of[blk]
        live = (s >= 0) & residual
        live[live.clone()] = self.fresh[layer, s[live]] & (off[live] < self.fill[layer, s[live]])
        if bool(live.any()):
            out[live] = self.vals[layer, s[live], off[live]].to(out_dtype)
        return out
