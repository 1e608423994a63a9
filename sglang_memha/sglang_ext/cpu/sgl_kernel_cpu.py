"""Pure-torch stand-in for the CPU build of ``sgl_kernel`` (served as ``sgl_kernel`` by
``cpu_boot`` only when no real ``sgl_kernel`` is installed).

SGLang's CPU engine imports a few names from ``sgl_kernel`` at module load. Every
``torch.ops.sgl_kernel.*_cpu`` call in layernorm, activation, rope and store_cache is behind
``cpu_has_amx_support()``, which is False without ``torch.ops.sgl_kernel.convert_weight_packed``,
so those layers take ``forward_native``. What is called is implemented here; any other name
resolves to a function that raises ``NotImplementedError`` naming it, so a new call site fails
loudly instead of computing garbage.
"""
from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+memha.cpu"


def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor,
                                tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """Copy KV rows ``src_loc -> tgt_loc`` in every buffer.

    data_ptrs: int64 [num_buffers], base address of each buffer (layer K or V).
    strides:   int64 [num_buffers], bytes per row (one token slot) of each buffer.
    tgt_loc, src_loc: int64 [n], row indices. Rows do not overlap (SGLang moves freed slots).
    """
    ptrs, strd = data_ptrs.tolist(), strides.tolist()
    tgt, src = tgt_loc.tolist(), src_loc.tolist()
    for base, stride in zip(ptrs, strd):
        for t, s in zip(tgt, src):
            ctypes.memmove(base + t * stride, base + s * stride, stride)


def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """``req_to_token[row, start:end] = out_cache_loc[pos:pos+n]`` per request, in order
    (same semantics as SGLang's Triton ``assign_req_to_token_pool``)."""
    pos = 0
    for row, s, e in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        req_to_token[row, s:e] = out_cache_loc[pos:pos + e - s].to(req_to_token.dtype)
        pos += e - s


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not in sglang-memha's CPU stand-in; install a real "
            f"sgl_kernel for this code path or run it on a GPU host")

    _missing.__name__ = name
    return _missing
