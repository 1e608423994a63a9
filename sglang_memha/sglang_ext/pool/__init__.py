"""The KV pool: where a request's KV lives on each server, as the format's raw bytes.

In request-path order: at scheduler start-up SGLang's KV cache configurator builds the pool class
``kv_hooks`` picks; during the prefill forward and every decode step, attention writes through
``quant_pool.MemhaQuantKVPool.set_kv_buffer`` (quantize on write; ``kivi_pool.OpenBlocks``
holds int4_kivi's open K blocks) and reads back only the rows it gathers (``QuantKVView``).
Pages that arrive on a decode stay in these bytes.
"""
