"""HookRegistry hooks of the quantized-KV path (scheduler processes, ``MEMHA_KV_FORMAT`` set).

| target (``sglang.srt.`` ...)                                      | type    | why |
|-------------------------------------------------------------------|---------|-----|
| ``mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class`` | AROUND | the MHA pool becomes ``MemhaQuantKVPool`` (refuses setups it cannot serve, at start-up) |
| ``model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size`` | AROUND | bytes per token from the format, so the same memory holds ~2x (fp8) to ~3.5x (int4) tokens |
| ``disaggregation.mooncake.conn.MooncakeKVManager`` / ``MooncakeKVReceiver`` | REPLACE | handshake + measured bytes (``mooncake_conn``) |
| ``disaggregation.mooncake.conn.KVArgsRegisterInfo.from_zmq``       | AROUND  | keeps decode's ``MEMHA1`` registration frame (``conn_handshake``) |
| ``disaggregation.mooncake.conn.TransferInfo.from_zmq``             | AROUND  | a decode with another page size: its pages kept aside, the worker slices prefill page positions (``repage``, ``conn_bridges``) |
| ``disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req`` | AFTER | on arrival: fnuz <-> fn bridge in place; eager ablation: dequantize into bf16 |
| ``managers.scheduler.Scheduler.run_batch`` (``MEMHA_PIPELINE=1``) | AROUND | prefill: per-layer send plan attached to the pool during an extend forward (``pipeline``) |
| ``mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool`` (always) | AFTER | prefill on SGLang's own bf16 or fp8 pool: describe it, so a memha decode accepts it and the sender converts its pages into that decode's format (``transcode``) |
| ``disaggregation.prefill.PrefillBootstrapQueue.__init__`` (always) | AFTER | stock fp8 prefill pool: read the model's per-layer K/V scales, which the conversion gives each row |

The Mooncake REPLACEs are also installed without ``MEMHA_KV_FORMAT`` (``register_metrics``) so
a stock-format PD pair logs the same measured-bytes line, for like-for-like comparisons.
"""
from __future__ import annotations

import functools
import logging

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_memha.config import load_config
from sglang_memha.kvformat import KVFormat, kv_bytes_per_token
from sglang_memha.kvformat.k_offset import model_id_of

logger = logging.getLogger("sglang_memha")

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_POOL_CONFIGURATOR = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
_MC = "sglang.srt.disaggregation.mooncake.conn"


class UnsupportedSetup(RuntimeError):
    """Raised at start-up when the server cannot serve MEMHA_KV_FORMAT; the text names the fix."""


def model_id(model_config) -> str:
    """Model identity both PD sides must share (``k_offset.model_id_of``)."""
    return model_id_of(model_config.hf_config, model_config.model_path)


def _refusals(kvc) -> list[str]:
    """Setups the quantized pool cannot serve (each reads the KV buffer some other way)."""
    sa = kvc.server_args
    out = []
    backends = {getattr(sa, n, None) for n in ("attention_backend", "prefill_attention_backend",
                                                "decode_attention_backend")} - {None}
    if backends != {"torch_native"}:
        out.append(f"attention backend {sorted(backends)} (use --attention-backend torch_native)")
    if getattr(kvc, "use_mla_backend", False):
        out.append("MLA models")
    if getattr(kvc, "is_hybrid_swa", False) or getattr(kvc, "mambaish_config", None) is not None:
        out.append("hybrid sliding-window / linear-attention models")
    if getattr(sa, "kv_cache_dtype", "auto") not in ("auto", None):
        out.append(f"--kv-cache-dtype {sa.kv_cache_dtype} (MEMHA_KV_FORMAT replaces it; drop the flag)")
    if getattr(sa, "speculative_algorithm", None):
        out.append("speculative decoding")
    if getattr(sa, "enable_hierarchical_cache", False):
        out.append("--enable-hierarchical-cache")
    return out


def resolve_pool_class(original, kvc, *, kind, default):
    """AROUND ``KVCacheConfigurator._resolve_kv_pool_class``; called once per pool kind while
    the scheduler builds its KV pool."""
    cls = original(kvc, kind=kind, default=default)
    if kind != "mha" or getattr(kvc, "is_draft_worker", False):
        return cls
    cfg = load_config()
    bad = _refusals(kvc)
    if bad:
        raise UnsupportedSetup(f"MEMHA_KV_FORMAT={cfg.kv_format} cannot serve: {'; '.join(bad)}. "
                               f"Fix these or unset MEMHA_KV_FORMAT")
    from sglang_memha.sglang_ext.pool.quant_pool import MemhaEagerKVPool, MemhaQuantKVPool

    base = MemhaEagerKVPool if _eager_decode(kvc.server_args) else MemhaQuantKVPool
    return base.configured(cfg.kv_format, cfg.k_transform, model_id(kvc.model_config), cfg.k_offset)


def _eager_decode(server_args) -> bool:
    return (load_config().decode_dequant == "eager"
            and getattr(server_args, "disaggregation_mode", "null") == "decode")


def cell_size(original, self, kvc, num_layers):
    """AROUND ``DefaultPoolConfigurator._compute_cell_size``: KV bytes per token of the format.

    SGLang's MHA formula is ``heads * (head_dim + v_head_dim) * layers * elem_size``; we keep its
    layer count and replace the per-(token, head) bytes with the format's row bytes."""
    stock = original(self, kvc, num_layers)
    if kvc.use_mla_backend:
        return stock
    mc = kvc.model_config
    from sglang.srt.runtime_context import get_parallel

    heads = mc.get_num_kv_heads(get_parallel().attn_tp_size, get_parallel().attn_dcp_size)
    elem = kvc.kv_cache_dtype.itemsize
    per_layer = heads * (mc.head_dim + mc.v_head_dim) * elem
    if stock % per_layer:
        raise UnsupportedSetup(f"MEMHA_KV_FORMAT: SGLang's cell size {stock} is not a whole number of "
                               f"MHA layers ({per_layer} B each); this model has extra KV state")
    layers = stock // per_layer
    quantized = layers * kv_bytes_per_token(KVFormat.parse(load_config().kv_format), heads, mc.head_dim)
    return quantized + (stock if _eager_decode(kvc.server_args) else 0)  # eager: + the bf16 rows


@functools.cache
def _corrupt_rooms() -> frozenset:
    """``MEMHA_TEST_CORRUPT_KV_ROOMS``, read once per process (not on every arrival)."""
    return load_config().test_corrupt_rooms


def land_on_arrival(result, queue, decode_req, *args, **kwargs):
    """AFTER ``DecodeTransferQueue._commit_transfer_to_req`` (decode scheduler, once per request
    whose KV arrived): verify the KV checksum when it is on (``integrity.verify_on_arrival``),
    apply the handshake's bridges (fnuz <-> fn) to the prompt's rows, then, in the eager
    ablation, dequantize them into the bf16 buffers. A checksum mismatch or a bridge that refuses
    the bytes (NaN codes) aborts the request with the reason; the caller then frees its pages."""
    from sglang.srt.disaggregation.utils import prepare_abort
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    from sglang_memha.sglang_ext.pool.quant_pool import MemhaEagerKVPool, MemhaQuantKVPool

    req = decode_req.req
    pool = queue.scheduler.token_to_kv_pool_allocator.get_kvcache()
    mgr = queue.scheduler.disagg_decode_prealloc_queue.kv_manager
    bridges = getattr(mgr, "memha_bridges", {}).pop(req.bootstrap_room, [])
    if (isinstance(req.finished_reason, FINISH_ABORT) or not isinstance(pool, MemhaQuantKVPool)
            or req.kv.req_pool_idx is None):
        return result
    slots = queue.scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :len(req.origin_input_ids)].long()
    from sglang_memha.sglang_ext.transfer import integrity

    rooms = _corrupt_rooms()
    if rooms:
        integrity.corrupt_for_test(pool, slots, req.bootstrap_room, rooms)
    mismatch = integrity.verify_on_arrival(queue.scheduler, req)
    if mismatch is not None:  # the wire's bytes, before any bridge rewrites them
        logger.error("sglang-memha: %s", mismatch)
        prepare_abort(req, "KV checksum mismatch", status_code=500)
        return result
    try:
        for bridge in bridges:
            pool.apply_bridge(slots, bridge)
    except ValueError as e:
        logger.error("sglang-memha: room %s: bridge failed: %s", req.bootstrap_room, e)
        prepare_abort(req, f"sglang-memha: KV bridge {bridges} refused the prefill's bytes: {e}",
                      status_code=500)
        return result
    if isinstance(pool, MemhaEagerKVPool):
        pool.land(slots)
    return result


def describe_stock_pool(pool, kvc, *args, **kwargs):
    """AFTER ``KVCacheConfigurator._build_mha_kv_pool`` (scheduler start-up, once). A prefill
    whose pool is SGLang's own plain MHA pool (``MEMHA_KV_FORMAT`` unset) gets a descriptor: a
    bf16 pool ``bf16``, so the sender quantizes the pages it sends into a memha decode's format
    (``Bridge.ENCODE_ON_SEND``); an fp8 pool (``--kv-cache-dtype fp8_e4m3``) ``fp8_e4m3_tensor``
    (its bytes), so an ``fp8_e4m3`` decode gets them with per-row scales
    (``Bridge.LAYER_TO_TOKEN_SCALE``, scales from ``record_layer_scales``). Anything else (our
    pools describe themselves; fp16 pools, HND layouts, MLA) stays undescribed: a memha decode
    then refuses it with a message. ``MEMHA_ENCODE_ON_SEND=0`` turns this off."""
    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    from sglang_memha.kvformat import FormatDescriptor
    from sglang_memha.sglang_ext import state

    cfg = load_config()
    if (cfg.kv_enabled or not cfg.encode_on_send or type(pool) is not MHATokenToKVPool
            or getattr(kvc.server_args, "disaggregation_mode", "null") != "prefill"):
        return pool
    fmt = {torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8_e4m3_tensor"}.get(pool.dtype)
    if (fmt is None or pool.head_dim != pool.v_head_dim
            or getattr(pool, "use_hnd", False) or getattr(pool, "kv_cache_layout", "nhd") != "nhd"):
        logger.warning("sglang-memha: prefill KV pool (%s, head_dim %s/%s) is not a plain bf16 or fp8_e4m3 "
                       "NHD pool: not converted on send (a decode with MEMHA_KV_FORMAT will refuse this "
                       "prefill; set MEMHA_KV_FORMAT here instead)", pool.dtype, pool.head_dim, pool.v_head_dim)
        return pool
    desc = FormatDescriptor(fmt=fmt, page_size=pool.page_size, num_kv_heads=pool.head_num,
                            head_dim=pool.head_dim, num_layers=pool.layer_num,
                            model_id=model_id(kvc.model_config))
    state.set_local_descriptor(desc, pool=pool, stock=True)
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


def register_metrics() -> None:
    """Measured-bytes Mooncake manager (and the handshake, which is inert without a format)."""
    from sglang_memha.sglang_ext.transfer import conn_bridges, conn_handshake, mooncake_conn

    HookRegistry.register(f"{_CONFIGURATOR}._build_mha_kv_pool", describe_stock_pool, HookType.AFTER)
    HookRegistry.register("sglang.srt.disaggregation.prefill.PrefillBootstrapQueue.__init__",
                          record_layer_scales, HookType.AFTER)

    HookRegistry.register(f"{_MC}.MooncakeKVManager", mooncake_conn.MemhaKVManager, HookType.REPLACE)
    HookRegistry.register(f"{_MC}.MooncakeKVReceiver", mooncake_conn.MemhaKVReceiver, HookType.REPLACE)
    HookRegistry.register(f"{_MC}.KVArgsRegisterInfo.from_zmq", conn_handshake.attach_memha_frame,
                          HookType.AROUND)
    HookRegistry.register(f"{_MC}.TransferInfo.from_zmq", conn_bridges.virtualize_repaged_destination,
                          HookType.AROUND)


def register_kv_format() -> None:
    HookRegistry.register(f"{_CONFIGURATOR}._resolve_kv_pool_class", resolve_pool_class, HookType.AROUND)
    HookRegistry.register(f"{_POOL_CONFIGURATOR}._compute_cell_size", cell_size, HookType.AROUND)
    HookRegistry.register("sglang.srt.disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req",
                          land_on_arrival, HookType.AFTER)
    if load_config().pipeline:
        from sglang_memha.sglang_ext.transfer.pipeline import around_run_batch

        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.run_batch", around_run_batch,
                              HookType.AROUND)
