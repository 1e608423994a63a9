"""``Bridge.REPAGE``: a prefill and a decode with different ``--page-size``.

Every KV format here is token-local (one code row and one scale row per (token, head), slot-indexed),
so re-paging is addressing only: each token's rows go to the slot that token has in the
decode's pages. This module is that addressing (pure numpy; tests/quant/test_repage.py) plus
the decode's acceptance of a prefill whose page size differs.

Coordinates. SGLang numbers a request's transferred pages from ``decode_prefix_len`` (0 unless
the decode's radix cache matched a prefix): the prefill's sender counts its own pages
(``P_p`` tokens each) in ``kv_chunk.index_slice``, the decode lists its pages (``P_d`` tokens
each) in ``TransferInfo.dst_kv_indices``. Token ``t`` (counted from ``decode_prefix_len``) sits
in prefill page position ``t // P_p`` and decode page ``dst_pages[t // P_d]``, slot
``dst_pages[t // P_d] * P_d + t % P_d``. A request's ``decode_prefix_len`` is a multiple of
``P_d``; it must also be one of ``P_p`` (checked: ``acceptance_problem``).

How the bridge rides on SGLang (0.5.23, ``srt/disaggregation/``):

* decode: ``try_ensure_parallel_info`` raises on any page-size difference
  (``common/conn.py:1320``); ``MemhaKVManager`` re-runs it through ``PageSizeProbe`` with the
  prefill's page size, then accepts the prefill only when ``acceptance_problem`` finds nothing
  (the per-request descriptor verdict still judges the formats).
* prefill: the transfer worker slices the destination by the chunk's prefill-page slice
  (``req.dst_kv_indices[kv_chunk.index_slice]``, ``mooncake/conn.py:2623``) and truncates, or
  skips, a chunk whose slice is longer than what it finds there. For a repaged decode session
  ``TransferInfo.dst_kv_indices`` therefore holds *prefill page positions*
  (``virtual_positions``; the decode's list is kept as ``.memha_decode_pages``), so the worker's
  slice hands ``send_kvcache`` the positions of the chunk's pages, and ``token_map`` /
  ``runs`` / ``blocks`` turn them into one Mooncake block per run of tokens whose source rows
  and decode slots are both consecutive.

Who calls what: ``register_session``/``forget_session`` -- prefill bootstrap thread, at decode
registration; ``session_page_sizes`` -- prefill bootstrap thread, per request metadata (AROUND
``TransferInfo.from_zmq``); ``token_map``/``runs``/``blocks`` -- prefill transfer worker, once
per chunk and repaged session. None blocks.
"""
from __future__ import annotations

import copy
import re
import threading
from dataclasses import dataclass

import numpy as np

from sglang_memha.kvformat.layout import token_blocks

# Prefill side: decode session id -> (prefill page size, decode page size). One SGLang
# scheduler process has one prefill KV manager, so a module-level table is enough (as
# ``state``); SGLang parses per-request metadata with a classmethod that cannot reach it.
_sessions: dict[str, tuple[int, int]] = {}
_lock = threading.Lock()


def register_session(session: str, src_page_size: int, dst_page_size: int) -> None:
    with _lock:
        _sessions[session] = (int(src_page_size), int(dst_page_size))


def forget_session(session: str) -> None:
    with _lock:
        _sessions.pop(session, None)


def session_page_sizes(session: str) -> tuple[int, int] | None:
    with _lock:
        return _sessions.get(session)


def virtual_positions(num_dst_pages: int, src_page_size: int, dst_page_size: int) -> np.ndarray:
    """``[ceil(num_dst_pages * P_d / P_p)]`` int32 ``0, 1, ...``: the prefill page positions the
    decode's pages cover (SGLang slices this by ``index_slice`` instead of the decode pages)."""
    return np.arange(-(-num_dst_pages * dst_page_size // src_page_size), dtype=np.int32)


@dataclass(frozen=True)
class TokenMap:
    """Where each token of one chunk is read and written. All ``[n_tokens]`` int64, in token
    order: ``src_slots`` prefill pool slots; ``staged_rows`` the token's row in a buffer holding
    the chunk's pages back to back (``k * P_p + j`` for token ``j`` of the chunk's page ``k``:
    ``transcode``'s staging); ``dst_slots`` decode pool slots."""
    src_slots: np.ndarray
    staged_rows: np.ndarray
    dst_slots: np.ndarray


def token_map(src_pages, positions, dst_pages, src_page_size: int, dst_page_size: int,
              n_tokens: int | None = None) -> TokenMap:
    """Map one chunk's tokens through the decode's pages.

    src_pages: [n] prefill page ids of the chunk; positions: [n] their page positions in the
    request (the worker's slice of ``virtual_positions``); dst_pages: [m] every decode page of
    the request, in order; n_tokens: the chunk's real tokens from its first page's first token
    (``kv_chunk.num_kv_tokens``; None: every token of its pages). Tokens past ``n_tokens`` (the
    unwritten tail of a last, partial prefill page) are dropped, and so are tokens past the
    decode's pages when ``n_tokens`` is None. ValueError for mismatched inputs or a real token
    the decode's pages do not hold.
    """
    src = np.asarray(src_pages, dtype=np.int64).reshape(-1)
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    dst = np.asarray(dst_pages, dtype=np.int64).reshape(-1)
    if len(src) != len(pos):
        raise ValueError(f"token_map: {len(src)} prefill pages but {len(pos)} page positions")
    if src_page_size <= 0 or dst_page_size <= 0:
        raise ValueError(f"token_map: page sizes must be positive, got {src_page_size} -> {dst_page_size}")
    j = np.arange(src_page_size, dtype=np.int64)
    tokens = (pos[:, None] * src_page_size + j).reshape(-1)
    src_slots = (src[:, None] * src_page_size + j).reshape(-1)
    staged = np.arange(len(tokens), dtype=np.int64)
    covered = len(dst) * dst_page_size
    if n_tokens is not None and len(pos):
        keep = tokens < pos[0] * src_page_size + int(n_tokens)
        if int(tokens[keep].max(initial=-1)) >= covered:
            raise ValueError(f"token_map: chunk token {int(tokens[keep].max())} is past the decode's "
                             f"{len(dst)} pages of {dst_page_size} tokens")
    else:
        keep = tokens < covered
    tokens = tokens[keep]
    return TokenMap(src_slots[keep], staged[keep],
                    dst[tokens // dst_page_size] * dst_page_size + tokens % dst_page_size)


def runs(src_rows: np.ndarray, dst_rows: np.ndarray) -> np.ndarray:
    """``[r, 3]`` int64 ``(first src row, first dst row, count)``: maximal runs where both
    ``src_rows`` and ``dst_rows`` ([n] int) advance by one. The grouping of SGLang's
    ``group_concurrent_contiguous`` (tested equal), without its per-member lists: here the
    members are token rows, 16-32x more than pages."""
    s = np.asarray(src_rows, dtype=np.int64)
    d = np.asarray(dst_rows, dtype=np.int64)
    if len(s) == 0:
        return np.zeros((0, 3), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, (np.diff(s) != 1) | (np.diff(d) != 1)])
    counts = np.diff(np.r_[starts, len(s)])
    return np.stack([s[starts], d[starts], counts], axis=1)


def blocks(row_runs: np.ndarray, src_base: int, dst_base: int, src_row_bytes: int,
           dst_row_bytes: int) -> list[tuple[int, int, int]]:
    """Mooncake ``(src address, dst address, bytes)`` per run, for one published buffer (a layer's
    K or V code rows, or their scale rows): a row is one token's bytes in that buffer; both sides'
    rows must have the same size."""
    if src_row_bytes != dst_row_bytes:
        raise ValueError(f"re-paging copies token rows: prefill rows are {src_row_bytes} B, decode "
                         f"rows {dst_row_bytes} B (the formats differ without a conversion)")
    return token_blocks(src_base, dst_base, src_row_bytes, row_runs)


# ---- decode side ---------------------------------------------------------------------------

_PREFILL_PAGE = re.compile(r"prefill server has page_size=(\d+)")


def prefill_page_size(error: str) -> int | None:
    """The prefill's page size in SGLang's page-size refusal (``common/conn.py:1322``), or None
    when ``error`` is not that refusal (then it is never bridged)."""
    m = _PREFILL_PAGE.search(error) if error.startswith("Page size mismatch") else None
    return int(m.group(1)) if m else None


class ManagerProbe:
    """The decode's KV manager as SGLang's ``try_ensure_parallel_info`` sees it, with some
    attributes replaced (``overrides``) and the prefill info landing in a scratch table: running
    the stock method on it applies every other stock check unchanged, and nothing is published
    before the caller accepts the prefill. Created and used on the decode scheduler thread."""

    def __init__(self, mgr, **overrides):
        self.__dict__.update(_mgr=mgr, prefill_info_table={}, **overrides)

    def __getattr__(self, name):
        return getattr(self._mgr, name)


class PageSizeProbe(ManagerProbe):
    """A ``ManagerProbe`` whose page size is the prefill's (then ``acceptance_problem`` decides)."""

    def __init__(self, mgr, prefill_page_size: int):
        kv_args = copy.copy(mgr.kv_args)
        kv_args.page_size = prefill_page_size
        super().__init__(mgr, kv_args=kv_args)


def acceptance_problem(decode_page_size: int, prefill_page_size: int, prefill_desc,
                       radix_cache: bool, state_types, peer: str) -> str | None:
    """Decode side: why a prefill at ``peer`` with another page size cannot be re-paged, or
    None. ``prefill_desc``: its sglang-memha descriptor (None: it publishes none, so it cannot
    re-page); ``radix_cache``: the decode's ``--disaggregation-decode-enable-radix-cache``."""
    sizes = f"prefill page_size={prefill_page_size}, decode page_size={decode_page_size}"
    if prefill_desc is None:
        return (f"Page size mismatch with prefill at {peer} ({sizes}): only an sglang-memha prefill "
                f"(MEMHA_KV_FORMAT set, or SGLang's own pool with MEMHA_ENCODE_ON_SEND=1) re-pages what "
                f"it sends; install sglang-memha there or use the same --page-size on both servers")
    if prefill_desc.page_size != prefill_page_size:
        return (f"prefill at {peer} describes page_size={prefill_desc.page_size} but registered "
                f"{prefill_page_size} with its bootstrap server; restart it")
    if state_types:
        return (f"Page size mismatch with prefill at {peer} ({sizes}): this decode's KV has state "
                f"components {[getattr(s, 'value', s) for s in state_types]}, which are paged and not "
                f"re-paged; use the same --page-size on both servers")
    if radix_cache and decode_page_size % prefill_page_size:
        return (f"Page size mismatch with prefill at {peer} ({sizes}): with "
                f"--disaggregation-decode-enable-radix-cache a cached prefix ends on a decode page, "
                f"which must also end a prefill page; use a decode page size that is a multiple of "
                f"the prefill's, or drop that flag")
    return None


__all__ = ["PageSizeProbe", "TokenMap", "acceptance_problem", "blocks", "forget_session",
           "prefill_page_size", "register_session", "runs", "session_page_sizes", "token_map",
           "virtual_positions"]
