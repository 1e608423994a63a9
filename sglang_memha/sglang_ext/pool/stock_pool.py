"""A prefill on SGLang's own KV pool (``MEMHA_KV_FORMAT`` unset), described so a memha decode can be
fed; and a decode on SGLang's own fp8 pool, described so a memha ``fp8_e4m3_tensor`` prefill can feed it.

Two HookRegistry AFTERs, registered by ``kv_hooks.register_metrics`` on every scheduler, both
once at start-up: ``describe_stock_pool`` (after ``KVCacheConfigurator._build_mha_kv_pool``)
publishes a descriptor of a plain bf16 or fp8 pool (``state``), which the handshake then offers
to decodes; ``record_layer_scales`` (after ``PrefillBootstrapQueue.__init__``, the model loaded)
keeps the fp8 pool's per-layer K/V scales for the send-time conversion (``transfer/transcode``).
"""
from __future__ import annotations

import logging

from sglang_memha.config import load_config
from sglang_memha.kvformat import KVFormat
from sglang_memha.sglang_ext.pool.configure import model_id

logger = logging.getLogger("sglang_memha")


def describe_stock_pool(pool, kvc, *args, **kwargs):
    """AFTER ``KVCacheConfigurator._build_mha_kv_pool`` (scheduler start-up, once, the model
    loaded). A prefill whose pool is SGLang's own plain MHA pool (``MEMHA_KV_FORMAT`` unset) gets a descriptor: a
    bf16 pool ``bf16``, so the sender quantizes the pages it sends into a memha decode's format
    (``Bridge.ENCODE_ON_SEND``); an fp8 pool (``--kv-cache-dtype fp8_e4m3``) ``fp8_e4m3_tensor``
    (its bytes), so an ``fp8_e4m3`` decode gets them with per-row scales
    (``Bridge.LAYER_TO_TOKEN_SCALE``, scales from ``record_layer_scales``). Anything else (our
    pools describe themselves; fp16 pools, HND layouts, MLA) stays undescribed: a memha decode
    then refuses it with a message. An fp8 pool states the model's per-layer K/V scales
    (``kv_scales``). A DECODE on SGLang's fp8 pool is described the same way, so a memha
    ``fp8_e4m3_tensor`` prefill can feed it (any SGLang attention backend reads those bytes) and
    the handshake compares the scales; a stock bf16 decode is left undescribed.
    ``MEMHA_ENCODE_ON_SEND=0`` turns this off."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_memha.kvformat import FormatDescriptor
    from sglang_memha.sglang_ext import state

    cfg = load_config()
    mode = getattr(kvc.server_args, "disaggregation_mode", "null")
    if (cfg.kv_enabled or not cfg.encode_on_send or type(pool) is not MHATokenToKVPool
            or mode not in ("prefill", "decode")):
        return pool
    fmt = {torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3_tensor"}.get(pool.dtype)
    if mode == "decode" and fmt != "fp8_e4m3_tensor":
        return pool  # a stock bf16 decode stays undescribed: a memha prefill refuses it by name
    if (fmt is None or pool.head_dim != pool.v_head_dim
            or getattr(pool, "use_hnd", False) or getattr(pool, "kv_cache_layout", "nhd") != "nhd"):
        logger.warning("sglang-memha: prefill KV pool (%s, head_dim %s/%s) is not a plain bf16 or fp8_e4m3 "
                       "NHD pool: not converted on send (a decode with MEMHA_KV_FORMAT will refuse this "
                       "prefill; set MEMHA_KV_FORMAT here instead)", pool.dtype, pool.head_dim, pool.v_head_dim)
        return pool
    scales = None
    if fmt == "fp8_e4m3_tensor":
        scales = _pool_scales(pool, getattr(kvc, "model", None))
        if scales is None and mode == "decode":
            logger.warning("sglang-memha: decode on SGLang's fp8 KV pool: the model's per-layer K/V scales "
                           "could not be read, so prefills are not checked against them (plain SGLang PD)")
            return pool
    desc = FormatDescriptor(fmt=fmt, page_size=pool.page_size, num_kv_heads=pool.head_num,
                            head_dim=pool.head_dim, num_layers=pool.layer_num,
                            model_id=model_id(kvc.model_config), kv_scales=scales)
    state.set_local_descriptor(desc, pool=pool, stock=True)
    if mode == "decode":
        logger.warning("sglang-memha: decode on SGLang's fp8 KV pool: accepts fp8_e4m3_tensor pages (a prefill "
                       "with MEMHA_KV_FORMAT=fp8_e4m3_tensor, or SGLang's fp8 pool) whose layer scales equal "
                       "this model's; a plain SGLang prefill is served as before")
        return pool
    logger.warning("sglang-memha: prefill on SGLang's %s KV pool: pages sent to a decode with "
                   "MEMHA_KV_FORMAT are converted into its format (MEMHA_ENCODE_ON_SEND=0 turns this off)",
                   "fp8" if fmt != "bf16" else "bf16")
    return pool


def attention_scales(model) -> dict[int, tuple[float, float]]:
    """{layer_id: (k_scale, v_scale)} of a model's attention layers (SGLang's ``RadixAttention``:
    ``k_scale_float`` / ``v_scale_float``, None = 1.0, the scales an fp8 KV pool divides by)."""
    out = {}
    for mod in model.modules():
        if hasattr(mod, "k_scale_float") and isinstance(getattr(mod, "layer_id", None), int):
            k, v = mod.k_scale_float, mod.v_scale_float
            out[mod.layer_id] = (1.0 if k is None else float(k), 1.0 if v is None else float(v))
    return out


def _pool_scales(pool, model) -> tuple[tuple[float, float], ...] | None:
    """(K, V) scale of each of ``pool``'s layers from the model's attention layers, or None when
    the model is not there or a layer has no attention module to read."""
    try:
        scales = attention_scales(model)
    except AttributeError:
        return None
    out = [scales.get(pool.start_layer + i) for i in range(pool.layer_num)]
    return None if any(x is None for x in out) else tuple(out)


def record_layer_scales(result, queue, *args, **kwargs):
    """AFTER ``PrefillBootstrapQueue.__init__`` (prefill start-up, after the model loaded): a
    described stock fp8 pool stores ``K / k_scale`` per layer; the sender needs those scales to
    give each row its scale on send (``transcode``). Kept on the pool as ``memha_kv_scales``."""
    from sglang_memha.sglang_ext import state

    pool = state.local_pool()
    desc = state.local_descriptor()
    if not state.local_is_stock() or desc is None or desc.fmt != KVFormat.FP8_E4M3_TENSOR:
        return result
    try:
        scales = attention_scales(queue.scheduler.tp_worker.model_runner.model)
    except AttributeError as e:
        logger.error("sglang-memha: cannot read the model's fp8 KV scales (%s): decodes asking for "
                     "fp8_e4m3 rows will be refused", e)
        return result
    pool.memha_kv_scales = [scales.get(pool.start_layer + i) for i in range(pool.layer_num)]
    return result
