"""The KV pool: where a request's KV lives on each server, as the format's raw bytes.

In request-path order: at scheduler start-up SGLang's KV cache configurator gets the pool class
and the bytes per token from ``configure`` (hooks registered by ``kv_hooks``); a prefill on
SGLang's own pool is described for memha decodes instead (``stock_pool``). During the prefill
forward and every decode step, attention writes through
``quant_pool.MemhaQuantKVPool.set_kv_buffer`` (quantize on write; ``kivi_pool.OpenBlocks`` holds
int4_kivi's open K blocks) and reads back only the rows it gathers (``QuantKVView``). Pages that
arrive on a decode stay in these bytes; the eager ablation (``eager_pool``) dequantizes them once,
on arrival. The byte geometry of every buffer comes from ``kvformat/layout.py``.
"""
