"""``MemhaEagerKVPool``: the decode pool of the eager-dequantization ablation (``MEMHA_DECODE_DEQUANT=eager``).

Chosen by ``configure.resolve_pool_class`` on a decode with ``MEMHA_DECODE_DEQUANT=eager``;
``arrival.land_on_arrival`` calls ``land`` once per request whose KV arrived; attention then
reads the bf16 rows directly. Exists to measure what deferred dequantization saves.
"""
from __future__ import annotations

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool


class MemhaEagerKVPool(MemhaQuantKVPool):
    """Decode pool of the eager-dequantization ablation (``MEMHA_DECODE_DEQUANT=eager``).

    Arrived pages land as quantized rows (the PD-registered ``k_buffer``/``v_buffer``, same
    geometry as the prefill's, so the wire is unchanged) and are dequantized once, on arrival,
    into bf16 buffers that attention reads directly (``land``). Tokens the decode server
    generates are written in bf16. The landing rows are slot-indexed (Mooncake writes page p of
    a request to the decode's page p), so this pool costs *more* memory per token than stock
    bf16; it exists to measure what deferred dequantization saves, not to be deployed.
    """

    def _create_buffers(self):
        super()._create_buffers()
        shape = (self.size + self.page_size, self.head_num, self.head_dim)
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.k_dense = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layer_num)]
            self.v_dense = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layer_num)]

    def bytes_per_token(self) -> int:
        return super().bytes_per_token() + 2 * self.layer_num * self.head_num * self.head_dim * self.dtype.itemsize

    def get_kv_size_bytes(self):
        k, v = super().get_kv_size_bytes()
        dense = sum(t.numel() * t.element_size() for t in self.k_dense)
        return k + dense, v + dense

    def land(self, slots: torch.Tensor) -> None:
        """Dequantize arrived rows ``slots`` ([n] int64) of every layer into the bf16 buffers.
        Called by the decode scheduler right after a request's transfer is committed."""
        for idx in range(self.layer_num):
            if self.open_blocks is not None:  # int4_kivi: K through its blocks' tables
                self.k_dense[idx][slots] = self.read_kivi_k(idx, slots, residual=False)
            else:
                self.k_dense[idx][slots] = self.read_slots(slots, True, idx)
            self.v_dense[idx][slots] = self.read_slots(slots, False, idx)

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        idx = layer_id - self.start_layer
        self.k_dense[idx][loc] = cache_k.reshape(-1, self.head_num, self.head_dim).to(self.dtype)
        self.v_dense[idx][loc] = cache_v.reshape(-1, self.head_num, self.head_dim).to(self.dtype)

    def _get_key_buffer(self, layer_id: int):
        return self.k_dense[layer_id - self.start_layer]

    def _get_value_buffer(self, layer_id: int):
        return self.v_dense[layer_id - self.start_layer]

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        """Retraction backup: the bf16 rows are the live KV here (landing rows are consumed)."""
        return [[self.k_dense[i][indices].clone(), self.v_dense[i][indices].clone()]
                for i in range(self.layer_num)]

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        for i, (k, v) in enumerate(kv_cache_cpu):
            self.k_dense[i][indices] = k.to(self.device)
            self.v_dense[i][indices] = v.to(self.device)
