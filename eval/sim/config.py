"""Typed views of the data files in ``eval/sim/data/``: models, devices (datasheet x efficiency), prices.

Every loader validates its entry and names the bad field, so a user editing a JSON file gets
``hardware.json: l40s.mem_bw_gbps=-1 is not valid: expected a positive number``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def _load(name: str) -> dict:
    with open(DATA_DIR / name) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _check_positive(where: str, obj: object, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for n in names:
        v = getattr(obj, n)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (v > 0 or (n in allow_zero and v == 0))
        if not ok:
            raise ValueError(f"{where}.{n}={v!r} is not valid: expected a positive number")


@dataclass(frozen=True)
class ModelConfig:
    """Transformer shape (decoder-only, GQA, SwiGLU MLP, RMSNorm)."""

    name: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qk_norm: bool
    weight_bytes: int = 2

    def __post_init__(self) -> None:
        _check_positive(f"models.json: {self.name}", self, (
            "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "weight_bytes"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"models.json: {self.name}.num_attention_heads={self.num_attention_heads} "
                             f"is not a multiple of num_key_value_heads={self.num_key_value_heads}")

    @property
    def layer_params(self) -> int:
        """Weight elements of one decoder layer (projections, MLP, norms)."""
        h, q, kv, d, i = (self.hidden_size, self.num_attention_heads, self.num_key_value_heads,
                          self.head_dim, self.intermediate_size)
        proj = h * q * d + 2 * h * kv * d + q * d * h
        mlp = 3 * h * i
        norms = 2 * h + (2 * d if self.qk_norm else 0)
        return proj + mlp + norms

    @property
    def total_params(self) -> int:
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return self.num_hidden_layers * self.layer_params + emb + head + self.hidden_size

    @property
    def weight_bytes_total(self) -> int:
        return self.total_params * self.weight_bytes


@dataclass(frozen=True)
class Device:
    """One accelerator type: datasheet peaks joined with efficiency factors and software overheads.

    Effective rates used by the roofline are ``peak * eff`` (FLOP/s and B/s).
    """

    name: str
    mem_type: str
    mem_gb: float
    mem_bw_gbps: float
    bf16_tflops: float
    fp8_tflops: float
    power_w: float
    nic_gbps: float
    gemm_eff: float
    attn_prefill_eff: float
    attn_decode_eff: float
    mem_eff: float
    prefill_step_overhead_s: float
    decode_step_overhead_s: float
    decode_per_request_overhead_s: float
    mem_fraction_static: float
    activation_reserve_gb: float
    kv_quant_flops_per_elem: float
    max_running_requests: int
    chunked_prefill_size: int
    # Optional: a separate effective FLOP/s for attention (the CPU testbed's torch_native SDPA is
    # much slower than its GEMMs). 0 means "bf16_tflops * attn_*_eff".
    attn_tflops: float = 0.0
    # Fixed time of every kernel the roofline prices (4 GEMMs and one attention per layer): the
    # floor small shapes hit (launch, tail). 0 unless a GPU calibration measured it (gpu_fit).
    kernel_latency_s: float = 0.0

    def __post_init__(self) -> None:
        _check_positive(f"hardware.json: {self.name}", self, (
            "mem_gb", "mem_bw_gbps", "bf16_tflops", "fp8_tflops", "nic_gbps", "gemm_eff",
            "attn_prefill_eff", "attn_decode_eff", "mem_eff", "mem_fraction_static",
            "max_running_requests", "chunked_prefill_size"),
            allow_zero=())
        _check_positive(f"efficiency.json: {self.name}", self, (
            "prefill_step_overhead_s", "decode_step_overhead_s", "decode_per_request_overhead_s",
            "activation_reserve_gb", "kv_quant_flops_per_elem", "power_w", "attn_tflops", "kernel_latency_s"),
            allow_zero=("prefill_step_overhead_s", "decode_step_overhead_s", "decode_per_request_overhead_s",
                        "activation_reserve_gb", "kv_quant_flops_per_elem", "power_w", "attn_tflops",
                        "kernel_latency_s"))
        for n in ("gemm_eff", "attn_prefill_eff", "attn_decode_eff", "mem_eff", "mem_fraction_static"):
            if getattr(self, n) > 1:
                raise ValueError(f"efficiency.json: {self.name}.{n}={getattr(self, n)} is not valid: expected <= 1")

    # effective rates ---------------------------------------------------------------------------
    @property
    def gemm_flops(self) -> float:
        return self.bf16_tflops * 1e12 * self.gemm_eff

    @property
    def attn_prefill_flops(self) -> float:
        base = self.attn_tflops * 1e12 if self.attn_tflops else self.bf16_tflops * 1e12
        return base * self.attn_prefill_eff

    @property
    def attn_decode_flops(self) -> float:
        base = self.attn_tflops * 1e12 if self.attn_tflops else self.bf16_tflops * 1e12
        return base * self.attn_decode_eff

    @property
    def mem_bw(self) -> float:
        return self.mem_bw_gbps * 1e9 * self.mem_eff


@lru_cache(maxsize=None)
def model_names() -> tuple[str, ...]:
    return tuple(_load("models.json"))


def load_model(name: str) -> ModelConfig:
    table = _load("models.json")
    if name not in table:
        raise ValueError(f"model {name!r} is not in models.json; expected one of: {', '.join(table)}")
    entry = {k: v for k, v in table[name].items() if k != "source"}
    return ModelConfig(name=name, **entry)


def load_device(name: str, **overrides: float) -> Device:
    """Datasheet entry of ``hardware.json`` merged with ``efficiency.json`` (default, then per device)."""
    hw = _load("hardware.json")
    if name not in hw:
        raise ValueError(f"device {name!r} is not in hardware.json; expected one of: {', '.join(hw)}")
    eff_table = _load("efficiency.json")
    merged: dict = {k: v for k, v in eff_table["default"].items() if k != "sources"}
    merged.update({k: v for k, v in eff_table.get(name, {}).items() if k != "sources"})
    merged.update({k: v for k, v in hw[name].items() if k not in ("source", "confidence")})
    known = {f.name for f in fields(Device)}
    unknown = set(merged) - known
    if unknown:
        raise ValueError(f"device {name!r}: unknown fields {sorted(unknown)}; expected a subset of {sorted(known)}")
    dev = Device(name=name, **merged)
    return replace(dev, **overrides) if overrides else dev


def device_names() -> tuple[str, ...]:
    return tuple(_load("hardware.json"))


def price_per_hour(name: str, kind: str = "on_demand") -> float:
    table = _load("prices.json")
    if name not in table:
        raise ValueError(f"device {name!r} has no entry in prices.json; expected one of: {', '.join(table)}")
    if kind not in ("on_demand", "spot"):
        raise ValueError(f"price kind={kind!r} is not valid: expected 'on_demand' or 'spot'")
    return float(table[name][kind])
