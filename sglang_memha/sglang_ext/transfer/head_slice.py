"""Different attention TP sizes on prefill and decode: each prefill rank's KV heads, sliced by head.

With attention TP ``Tp`` on the prefill and ``Td`` on the decode, every rank holds ``H / T`` of the
model's ``H`` KV heads (rank ``r``: heads ``[r H/T, (r + 1) H/T)``), and SGLang's transfer worker
sends each (prefill rank, decode rank) pair the rows of the heads they share through
``MooncakeKVManager.send_kvcache_slice``: ``Tp > Td`` merges several prefill ranks' heads into one
decode rank's rows, ``Tp < Td`` splits one prefill rank's heads over decode ranks. Which heads,
and where they go, is SGLang's ``compute_head_slice_params`` (called here, not copied).

SGLang's own ``send_kvcache_slice`` takes one bytes-per-head figure, the first entry's
(``dst_kv_item_len // page_size // heads``), for every entry. A memha pool publishes data and
scale buffers (format v4, ``kvformat/layout.py``) whose rows differ in size (fp8_e4m3 at head_dim
64: 64 B and 2 B), so its scale entries would get data-sized blocks at data-sized offsets. Here
the same head mapping is applied to each entry with its own row bytes
(``layout.head_slice_blocks``); for ``bf16`` and ``fp8_e4m3_tensor`` (no scale rows) the
blocks equal SGLang's (``tests/quant/test_head_slice.py`` checks both against SGLang's code).

The ``MemhaKVManager`` part: at a decode's registration (prefill bootstrap thread) whether its
pages can be head-sliced (``_head_slice_problem``; a reason rejects the decode, so each of its
rooms fails with it), and the blocks of one chunk (``_send_head_sliced``, transfer worker,
blocking for the transfer). The decode needs nothing: Mooncake writes its own heads' rows into
its pages, whichever prefill ranks they come from. A K offset (``MEMHA_K_OFFSET``) is per
(layer, kv head, channel): each rank's pool subtracts its own heads' rows of the file
(``k_offset.for_rank``), so a head's stored rows are the same on any TP size and slicing keeps
them valid. Not combined: a send-time bridge (format conversion, re-paging; refused by the
descriptor check), pipeline parallelism, SGLang's staging buffer, DCP, extra KV state, replicated
KV heads (refused by the descriptor check), and the per-layer pipeline (which leaves these
sessions to this send after the forward).
"""
from __future__ import annotations

import logging

import numpy as np

from sglang_memha.kvformat.layout import PoolLayout, head_slice_blocks

logger = logging.getLogger("sglang_memha")

# Blocks per Mooncake call. Each block is one transfer request; Mooncake's TCP transport queues at
# most MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER (default 1024) per peer and sending process, and
# rejects the rest after a short admission wait. A head slice is one block per (entry, token)
# (a 150-token fp8 request at TP 2 -> 1: 1280 blocks per rank), and SGLang's transfer threads
# share that queue, so such calls failed under load (tests/quant/test_tp_pd.py); 256 per call
# leaves room for four concurrent calls.
MAX_BLOCKS_PER_CALL = 256


class HeadSliceMixin:
    """Mixed into ``MemhaKVManager`` before SGLang's ``MooncakeKVManager``. Uses the manager's
    ``memha_desc`` and ``memha_sliced`` (decode session -> its ``PoolLayout``), and SGLang's
    ``kv_args``, ``attn_tp_size``, ``pp_size``, ``enable_staging``."""

    def _head_slice_problem(self, registration_info, decode_desc) -> str | None:
        """Prefill, bootstrap thread, once per registration of a decode whose attention TP size
        differs and whose descriptor passed the check: None (and the session is recorded for
        ``_send_head_sliced``) or why its pages cannot be head-sliced."""
        session = registration_info.mooncake_session_id
        self.memha_sliced.pop(session, None)
        src, dst = PoolLayout.of(self.memha_desc), PoolLayout.of(decode_desc)
        tps = f"attention TP prefill={self.attn_tp_size} decode={registration_info.dst_attn_tp_size}"
        fix = "use the same --tp-size on both servers"
        if self.pp_size != 1:
            return f"{tps}: head slicing supports one pipeline stage (pp_size={self.pp_size}); {fix}"
        if getattr(self, "enable_staging", False):
            return (f"{tps}: SGLANG_DISAGG_STAGING_BUFFER is set; its staging path copies bf16 rows "
                    f"of one size, not sglang-memha's data and scale rows: unset it, or {fix}")
        if registration_info.dst_dcp_size != 1 or getattr(registration_info, "requires_dcp_relayout", False):
            return f"{tps}: head slicing is not combined with decode context parallelism; {fix}"
        states = getattr(self.kv_args, "state_types", None) or []
        if states:
            return (f"{tps}: this prefill's KV has state components "
                    f"{[getattr(t, 'value', t) for t in states]}, which are not head-sliced; {fix}")
        if list(self.kv_args.kv_item_lens) != src.item_lens():
            return (f"{tps}: this prefill publishes {len(self.kv_args.kv_item_lens)} KV buffers, not the "
                    f"{len(src.entries)} of its {src.fmt.value} pool (draft or extra KV?); {fix}")
        got = list(getattr(registration_info, "dst_kv_item_lens", None) or [])
        if len(registration_info.dst_kv_ptrs) != len(dst.entries) or (got and got != dst.item_lens()):
            return (f"{tps}: decode registered {len(registration_info.dst_kv_ptrs)} KV buffers of "
                    f"{sorted(set(got))} B per page, a {dst.fmt.value} pool of {dst.heads} kv heads has "
                    f"{len(dst.entries)} of {sorted(set(dst.item_lens()))}; {fix}")
        self.memha_sliced[session] = dst
        return None

    def _send_head_sliced(self, session: str, prefill_kv_indices, dst_kv_ptrs, dst_kv_indices,
                          dst_tp_rank: int, dst_attn_tp_size: int, dst: PoolLayout) -> int:
        """Transfer worker: this rank's share of the heads of decode rank ``dst_tp_rank``, for
        pages ``prefill_kv_indices`` -> ``dst_kv_indices``, in Mooncake calls of at most
        ``MAX_BLOCKS_PER_CALL`` blocks, one after another; 0, or the first non-zero status."""
        from sglang.srt.disaggregation.common.staging_buffer import (compute_head_slice_params,
                                                                     resolve_total_kv_heads)

        total = resolve_total_kv_heads(self.kv_args, self.attn_tp_size)
        src_head, num_heads, dst_head, _ = compute_head_slice_params(
            self.attn_tp_size, dst_attn_tp_size, self.kv_args.engine_rank, dst_tp_rank, total)
        try:
            blocks = head_slice_blocks(PoolLayout.of(self.memha_desc), dst, list(self.kv_args.kv_data_ptrs),
                                       list(dst_kv_ptrs), np.asarray(prefill_kv_indices),
                                       np.asarray(dst_kv_indices), src_head=src_head, dst_head=dst_head,
                                       num_heads=num_heads)
        except ValueError as e:
            logger.error("sglang-memha: session %s: %s", session, e)
            return -1
        for i in range(0, len(blocks), MAX_BLOCKS_PER_CALL):
            if (ret := self._transfer_data(session, blocks[i:i + MAX_BLOCKS_PER_CALL])) != 0:
                return ret
        return 0
