"""HookRegistry table of the quantized-KV path (scheduler processes); each hook lives with its concern.

| target (``sglang.srt.`` ...)                                      | type    | why | hook |
|-------------------------------------------------------------------|---------|-----|------|
| ``mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class`` | AROUND | the MHA pool becomes ``MemhaQuantKVPool`` (refuses setups it cannot serve, at start-up) | ``pool/configure.resolve_pool_class`` |
| ``model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size`` | AROUND | bytes per token from the format, so the same memory holds ~2x (fp8) to ~3.5x (int4) tokens | ``pool/configure.cell_size`` |
| ``disaggregation.mooncake.conn.MooncakeKVManager`` / ``MooncakeKVReceiver`` | REPLACE | handshake + measured bytes + send-time bridges | ``transfer/mooncake_conn`` |
| ``disaggregation.mooncake.conn.KVArgsRegisterInfo.from_zmq``       | AROUND  | keeps decode's ``MEMHA1`` registration frame | ``transfer/conn_handshake.attach_memha_frame`` |
| ``disaggregation.mooncake.conn.TransferInfo.from_zmq``             | AROUND  | a decode with another page size: its pages kept aside, the worker slices prefill page positions (``repage``) | ``transfer/conn_bridges.virtualize_repaged_destination`` |
| ``disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req`` | AFTER | on arrival: KV checksum, fnuz <-> fn bridge in place; eager ablation: dequantize into bf16 | ``transfer/arrival.land_on_arrival`` |
| ``managers.scheduler.Scheduler.run_batch`` (``MEMHA_PIPELINE=1``) | AROUND | prefill: per-layer send plan attached to the pool during an extend forward | ``transfer/pipeline.around_run_batch`` |
| ``disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req`` (always) | BEFORE | the received-bytes metric (returns at once without ``--enable-metrics``) | ``transfer/arrival.count_arrived`` |
| ``mem_cache.kv_cache_configurator.KVCacheConfigurator._build_mha_kv_pool`` (always) | AFTER | prefill on SGLang's own bf16 or fp8 pool: describe it, so a memha decode accepts it and the sender converts its pages into that decode's format (``transcode``); decode on SGLang's fp8 pool: describe it with the model's layer scales, so a memha ``fp8_e4m3_tensor`` prefill can feed it | ``pool/stock_pool.describe_stock_pool`` |
| ``disaggregation.prefill.PrefillBootstrapQueue.__init__`` (always) | AFTER | stock fp8 prefill pool: read the model's per-layer K/V scales, which the conversion gives each row | ``pool/stock_pool.record_layer_scales`` |
| ``disaggregation.{prefill,decode}.prepare_abort`` (always) | AROUND | a request whose KV is non-finite fails with 400, not 500: the router neither retries it nor counts it against the workers' circuit breakers | ``transfer/mooncake_conn.abort_status_of_request_faults`` |

The Mooncake REPLACEs are also installed without ``MEMHA_KV_FORMAT`` (``register_metrics``) so
a stock-format PD pair logs the same measured-bytes line, for like-for-like comparisons. Called
from ``plugin.register()`` in scheduler processes only; registering imports the hooks' modules,
SGLang applies them right after (``HookRegistry.apply_hooks``).
"""
from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from sglang_memha.config import load_config

_CONFIGURATOR = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator"
_POOL_CONFIGURATOR = "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator"
_MC = "sglang.srt.disaggregation.mooncake.conn"


def register_metrics() -> None:
    """Measured-bytes Mooncake manager (and the handshake, which is inert without a format)."""
    from sglang_memha.sglang_ext.pool.stock_pool import describe_stock_pool, record_layer_scales
    from sglang_memha.sglang_ext.transfer import arrival, conn_bridges, conn_handshake, mooncake_conn

    HookRegistry.register(f"{_CONFIGURATOR}._build_mha_kv_pool", describe_stock_pool, HookType.AFTER)
    HookRegistry.register("sglang.srt.disaggregation.prefill.PrefillBootstrapQueue.__init__",
                          record_layer_scales, HookType.AFTER)

    HookRegistry.register(f"{_MC}.MooncakeKVManager", mooncake_conn.MemhaKVManager, HookType.REPLACE)
    HookRegistry.register(f"{_MC}.MooncakeKVReceiver", mooncake_conn.MemhaKVReceiver, HookType.REPLACE)
    HookRegistry.register(f"{_MC}.KVArgsRegisterInfo.from_zmq", conn_handshake.attach_memha_frame,
                          HookType.AROUND)
    HookRegistry.register(f"{_MC}.TransferInfo.from_zmq", conn_bridges.virtualize_repaged_destination,
                          HookType.AROUND)
    HookRegistry.register("sglang.srt.disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req",
                          arrival.count_arrived, HookType.BEFORE)
    for side in ("prefill", "decode"):  # each calls the name it imported from disaggregation.utils
        HookRegistry.register(f"sglang.srt.disaggregation.{side}.prepare_abort",
                              mooncake_conn.abort_status_of_request_faults, HookType.AROUND)


def register_kv_format() -> None:
    """The pool and arrival hooks (``MEMHA_KV_FORMAT`` set), and the pipeline's (``MEMHA_PIPELINE=1``)."""
    from sglang_memha.sglang_ext.pool.configure import cell_size, resolve_pool_class
    from sglang_memha.sglang_ext.transfer.arrival import land_on_arrival

    HookRegistry.register(f"{_CONFIGURATOR}._resolve_kv_pool_class", resolve_pool_class, HookType.AROUND)
    HookRegistry.register(f"{_POOL_CONFIGURATOR}._compute_cell_size", cell_size, HookType.AROUND)
    HookRegistry.register("sglang.srt.disaggregation.decode.DecodeTransferQueue._commit_transfer_to_req",
                          land_on_arrival, HookType.AFTER)
    if load_config().pipeline:
        from sglang_memha.sglang_ext.transfer.pipeline import around_run_batch

        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.run_batch", around_run_batch,
                              HookType.AROUND)
