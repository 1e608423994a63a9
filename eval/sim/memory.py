"""KV pool capacity of one instance, in tokens, from its memory and the pool format.

    usable = mem_gb * mem_fraction_static - weights - activation_reserve
    tokens = floor(usable / (num_layers * kv_bytes_per_token_layer(format)))

(SGLang sizes its pool the same way: a static fraction of device memory minus weights.)
"""

from __future__ import annotations

from .config import Device, ModelConfig
from .roofline import kv_bytes_per_token_model


def kv_capacity_tokens(model: ModelConfig, dev: Device, pool_fmt: str) -> int:
    usable = dev.mem_gb * 1e9 * dev.mem_fraction_static - model.weight_bytes_total - dev.activation_reserve_gb * 1e9
    if usable <= 0:
        return 0
    return int(usable // kv_bytes_per_token_model(model, pool_fmt))
