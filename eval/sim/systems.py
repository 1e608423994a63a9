"""Build a ``ClusterSpec`` for (model, system from systems.json, #prefill, #decode instances)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .cluster import ClusterSpec, DecodeSpec, PrefillSpec
from .config import DATA_DIR, Device, ModelConfig, load_device, load_model, price_per_hour
from .memory import kv_capacity_tokens
from .roofline import DecodeCost, decode_cost, kv_bytes_per_token_model, prefill_step_time
from .transfer import Link


@lru_cache(maxsize=None)
def systems_table() -> dict:
    with open(DATA_DIR / "systems.json") as f:
        return json.load(f)


@dataclass(frozen=True)
class System:
    name: str
    prefill: str
    decode: str
    wire: str
    pool: str
    pipelined: bool
    link_gbps: float | None
    label: str


def load_system(name: str) -> System:
    table = systems_table()["systems"]
    if name not in table:
        raise ValueError(f"system {name!r} is not in systems.json; expected one of: {', '.join(table)}")
    return System(name=name, **table[name])


def system_names() -> tuple[str, ...]:
    return tuple(systems_table()["systems"])


def slo(trace_name: str) -> tuple[float, float]:
    s = systems_table()["slo"]
    if trace_name not in s:
        raise ValueError(f"no SLO for trace {trace_name!r} in systems.json; expected one of: "
                         f"{', '.join(k for k in s if k != 'sources')}")
    return float(s[trace_name]["ttft_s"]), float(s[trace_name]["tpot_s"])


@lru_cache(maxsize=None)
def _decode_cost(model: str, device: str, pool: str) -> DecodeCost:
    return decode_cost(load_model(model), load_device(device), pool)


def prefill_spec(m: ModelConfig, dev: Device, wire: str, link: Link, cost_per_hour: float) -> PrefillSpec:
    def step(new: np.ndarray, cached: np.ndarray, n_fin: int) -> float:
        return prefill_step_time(m, dev, new, cached, n_fin, wire)

    return PrefillSpec(step_time=step, n_layers=m.num_hidden_layers,
                       capacity_tokens=kv_capacity_tokens(m, dev, wire),
                       chunk_tokens=dev.chunked_prefill_size, link=link,
                       wire_bytes_per_token=kv_bytes_per_token_model(m, wire),
                       cost_per_hour=cost_per_hour, name=dev.name)


def decode_spec(m: ModelConfig, dev: Device, pool: str, cost_per_hour: float) -> DecodeSpec:
    return DecodeSpec(cost=_decode_cost(m.name, dev.name, pool), capacity_tokens=kv_capacity_tokens(m, dev, pool),
                      max_batch=dev.max_running_requests, cost_per_hour=cost_per_hour, name=dev.name)


def build_cluster(model: str, system: str, n_prefill: int, n_decode: int, price: str = "on_demand") -> ClusterSpec:
    if n_prefill < 1 or n_decode < 1:
        raise ValueError(f"n_prefill={n_prefill}, n_decode={n_decode}: expected >= 1 each")
    m = load_model(model)
    s = load_system(system)
    pdev, ddev = load_device(s.prefill), load_device(s.decode)
    lk = systems_table()["link"]
    gbps = s.link_gbps if s.link_gbps is not None else min(pdev.nic_gbps, ddev.nic_gbps)
    link = Link(gbps=gbps, latency_s=lk["latency_s"], slice_overhead_s=lk["slice_overhead_s"])
    p = prefill_spec(m, pdev, s.wire, link, price_per_hour(s.prefill, price))
    d = decode_spec(m, ddev, s.pool, price_per_hour(s.decode, price))
    return ClusterSpec(prefill=(p,) * n_prefill, decode=(d,) * n_decode, pipelined=s.pipelined,
                       handoff_s=lk["handoff_s"])
