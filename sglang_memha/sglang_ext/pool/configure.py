"""Which KV pool class a scheduler builds, and how many bytes a token of it takes (``MEMHA_KV_FORMAT``).

Both are HookRegistry AROUNDs registered by ``kv_hooks.register_kv_format`` and called by SGLang
once, at scheduler start-up, while it sizes and builds the KV pool: ``cell_size`` (from
``DefaultPoolConfigurator._compute_cell_size``) makes the same memory hold ~2x (fp8) to ~3.5x
(int4) the tokens; ``resolve_pool_class`` (from ``KVCacheConfigurator._resolve_kv_pool_class``)
turns the MHA pool into ``MemhaQuantKVPool`` (``MemhaEagerKVPool`` on an eager decode), or stops
start-up with ``UnsupportedSetup`` naming what this server cannot serve and the fix.
"""
from __future__ import annotations

from sglang_memha.config import load_config
from sglang_memha.kvformat import KVFormat, kv_bytes_per_token
from sglang_memha.kvformat.k_offset import model_id_of
from sglang_memha.sglang_ext.attention_backend import backends_of


# Attention backends that read a MemhaQuantKVPool: torch_native through ``QuantKVView``,
# memha_triton (``sglang_ext/attention_triton.py``) from the raw pages.
READS_QUANTIZED_POOL = {"torch_native", "memha_triton"}


class UnsupportedSetup(RuntimeError):
    """Raised at start-up when the server cannot serve MEMHA_KV_FORMAT; the text names the fix."""


def model_id(model_config) -> str:
    """Model identity both PD sides must share (``k_offset.model_id_of``)."""
    return model_id_of(model_config.hf_config, model_config.model_path)


def _refusals(kvc) -> list[str]:
    """Setups the quantized pool cannot serve (each reads the KV buffer some other way)."""
    sa = kvc.server_args
    out = []
    backends = backends_of(sa)
    if not backends or not backends <= READS_QUANTIZED_POOL:
        out.append(f"attention backend {sorted(backends)} (use --attention-backend memha_triton on a GPU, "
                   f"torch_native on CPU)")
    if getattr(kvc, "use_mla_backend", False):
        out.append("MLA models")
    if getattr(kvc, "is_hybrid_swa", False) or getattr(kvc, "mambaish_config", None) is not None:
        out.append("hybrid sliding-window / linear-attention models")
    # bfloat16 is accepted: it is the dtype the pool's reads return (the model's dtype with
    # "auto"), e.g. a float32-compute model whose KV path should be a bf16 model's (eval benches
    # on CPUs without a bf16 GEMM path); the bytes stored are the format's either way.
    if getattr(sa, "kv_cache_dtype", "auto") not in ("auto", None, "bfloat16"):
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
    from sglang_memha.sglang_ext.pool.eager_pool import MemhaEagerKVPool
    from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool

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
