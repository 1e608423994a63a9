"""``MemhaTritonAttnBackend``: the class behind ``--attention-backend memha_triton``.

Why it exists, what it replaces and who calls it: ``attention_backend.py``. Imported only by
``attention_backend.create_backend`` (SGLang's Triton backend module imports ``triton`` at load).

Tensors at the two entry points (SGLang's ``RadixAttention`` passes them)::

    q  [tokens, tp_q_head_num * head_dim]   model dtype (bf16; fp32 for --dtype float32)
    k  [tokens, tp_k_head_num, head_dim]    model dtype, model space (no transform, no offset)
    v  [tokens, tp_k_head_num, head_dim]
    -> o [tokens, tp_q_head_num * head_dim] q's dtype

Pool buffers read per layer ``l`` (``MemhaQuantKVPool``, format v4): ``k_buffer[l]`` /
``v_buffer[l]`` uint8 [slots, kv_heads, data_bytes] and ``scale_rows(is_key, l)`` uint8
[slots, kv_heads, scale_bytes] or None.
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend, logit_capping_mod
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from sglang_memha.attention.decode import decode_attention, default_num_kv_splits
from sglang_memha.kvformat.transforms import apply_k_transform
from sglang_memha.sglang_ext.attention_backend import BACKEND_NAME, UnsupportedAttention, format_refusal, refusals
from sglang_memha.sglang_ext.pool.eager_pool import MemhaEagerKVPool
from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool

logger = logging.getLogger("sglang_memha")


class MemhaTritonAttnBackend(TritonAttnBackend):
    """SGLang's ``TritonAttnBackend`` whose decode and extend kernels read quantized pages."""

    def __init__(self, model_runner, *args, **kwargs):
        bad = refusals(model_runner)
        if bad:
            raise UnsupportedAttention(f"--attention-backend {BACKEND_NAME} cannot serve: {'; '.join(bad)}. "
                                       f"Use --attention-backend torch_native (CPU) or SGLang's own backends "
                                       f"without MEMHA_KV_FORMAT")
        super().__init__(model_runner, *args, **kwargs)
        pool = self.token_to_kv_pool
        quantized = isinstance(pool, MemhaQuantKVPool) and not isinstance(pool, MemhaEagerKVPool)
        self.memha_pool: MemhaQuantKVPool | None = pool if quantized else None
        if self.memha_pool is None:  # SGLang's own pool, or the eager ablation's bf16 rows
            logger.warning("sglang-memha: %s on %s: SGLang's Triton kernels, unchanged", BACKEND_NAME,
                           type(pool).__name__)
            return
        why = format_refusal(pool.memha_format)
        if why:
            raise UnsupportedAttention(why)
        # Fixed at start-up, so a decode step has no host read and replays under CUDA graphs.
        self.memha_num_kv_splits = default_num_kv_splits(self.max_context_len)
        self.v_head_dim = pool.v_head_dim  # SGLang read the uint8 buffer's last dim
        logger.warning("sglang-memha: attention backend %s reads %s pages in the kernel (k_transform=%s, "
                       "k_offset=%s, decode kv splits %d)", BACKEND_NAME, pool.memha_format.value, pool.memha_k_transform,
                       pool.k_offset is not None, self.memha_num_kv_splits)

    # ---- decode: one query token per request ---------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None,
                       score_mod=None, aux_tensors=None):
        if self.memha_pool is None:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks, score_mod,
                                          aux_tensors)
        _refuse_layer(layer, sinks, score_mod)
        if save_kv_cache:
            self._write(layer, forward_batch, k, v)
        pool, md = self.memha_pool, self.forward_metadata
        idx = layer.layer_id - pool.start_layer
        qh = self._q_in_stored_space(q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim))
        o = decode_attention(pool.memha_format, qh, pool.k_buffer[idx], pool.scale_rows(True, idx),
                             pool.v_buffer[idx], pool.scale_rows(False, idx), md.kv_indptr, md.kv_indices,
                             layer.scaling, num_kv_splits=self.memha_num_kv_splits, out_dtype=q.dtype,
                             logit_cap=_logit_cap(layer))
        return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _q_in_stored_space(self, q: torch.Tensor) -> torch.Tensor:
        """q [n, Hq, D] -> q H where keys are stored rotated (module docstring of attention_backend)."""
        if self.memha_pool.memha_k_transform == "none":
            return q.contiguous()
        return apply_k_transform(self.memha_pool.memha_k_transform, q.float()).to(q.dtype).contiguous()

    # ---- extend: new tokens against the cached prefix ------------------------------------------
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None,
                       score_mod=None, aux_tensors=None):
        if self.memha_pool is None:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks, score_mod,
                                          aux_tensors)
        _refuse_layer(layer, sinks, score_mod)
        if k is None or v is None:
            raise NotImplementedError(f"{BACKEND_NAME}: this model reads K/V back from the cache in an extend "
                                      f"(cross-layer KV sharing), which the quantized pool does not serve")
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY:
            raise NotImplementedError(f"{BACKEND_NAME}: cross / encoder-only attention is not supported")
        if not save_kv_cache:
            raise NotImplementedError(f"{BACKEND_NAME}: an extend that does not write its K/V is not supported")
        self._write(layer, forward_batch, k, v)
        md = self.forward_metadata
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        k_prefix, v_prefix, ident = self._prefix_scratch(layer, forward_batch)
        # The chunk's own tokens as stored (read back, dequantized): every token attends to the
        # values later steps will read, so the tokens do not depend on the attention backend or
        # on where chunks were cut (torch_native reads them the same way).
        new = forward_batch.out_cache_loc
        k_new = self.memha_pool.get_key_buffer(layer.layer_id)[new]
        v_new = self.memha_pool.get_value_buffer(layer.layer_id)[new]
        o = q.new_empty((q.shape[0], hq * dv))
        self.extend_attention_fwd(
            q.view(-1, hq, d), k_new.to(q.dtype), v_new.to(q.dtype), o.view(-1, hq, dv), k_prefix, v_prefix,
            md.qo_indptr, md.kv_indptr, ident, md.custom_mask, True, md.mask_indptr, md.max_extend_len,
            1.0, 1.0, layer.scaling, logit_cap=_logit_cap(layer), sliding_window_size=-1, sinks=None,
            xai_temperature_len=layer.xai_temperature_len, page_size=1,
            extend_seq_lens_cpu=forward_batch.extend_seq_lens_cpu)
        return o

    def _prefix_scratch(self, layer, forward_batch):
        """The batch's prefix rows of this layer, dequantized to model space:
        (k [n, H, D], v [n, H, D] in the pool's dtype, identity indices [n] int64). Request b's
        prefix is rows ``kv_indptr[b]:kv_indptr[b+1]``, as in SGLang's ``kv_indices``."""
        md, pool = self.forward_metadata, self.memha_pool
        lens = forward_batch.extend_prefix_lens_cpu
        n = int(sum(lens)) if lens is not None else int(md.kv_indptr[forward_batch.batch_size])  # host read
        slots = md.kv_indices[:n]
        if n == 0:  # a valid pointer for the kernel; no row is read
            empty = torch.zeros((1, pool.head_num, pool.head_dim), dtype=pool.dtype, device=pool.device)
            return empty, empty, slots
        k = pool.get_key_buffer(layer.layer_id)[slots]
        v = pool.get_value_buffer(layer.layer_id)[slots]
        return k, v, torch.arange(n, dtype=torch.int64, device=slots.device)

    def _write(self, layer, forward_batch, k, v) -> None:
        loc = KVWriteLoc.for_batch(forward_batch, swa_loc=self.forward_metadata.swa_out_cache_loc)
        self.token_to_kv_pool.set_kv_buffer(layer, loc, k, v)


def _refuse_layer(layer, sinks, score_mod) -> None:
    """Per-layer guards for what start-up refusals cannot see (a model's own attention options)."""
    if sinks is not None or score_mod is not None:
        raise NotImplementedError(f"{BACKEND_NAME}: attention sinks / score_mod are not supported")
    if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
        raise NotImplementedError(f"{BACKEND_NAME}: sliding-window layers are not supported")


def _logit_cap(layer) -> float:
    """The layer's soft-cap as SGLang's Triton kernels take it (0: none)."""
    return float(logit_capping_mod(layer.logit_capping_method, layer.logit_cap) or 0.0)
