"""Goodput per dollar: instance prices (``prices.json`` here, then the simulator's GPU table).

``per_dollar(goodput_rps, usd_per_hour)`` = requests served within SLO per dollar at the goodput
rate: ``goodput * 3600 / usd_per_hour``.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRICES = HERE / "prices.json"
SIM_PRICES = HERE.parent / "sim" / "data" / "prices.json"
COLUMNS = ("on_demand", "spot")


def load_prices(path: Path = PRICES, fallback: Path | None = SIM_PRICES) -> dict:
    """The price table: ``fallback``'s entries, overridden by ``path``'s (which holds ``deployment``)."""
    table: dict = {}
    if fallback is not None and fallback.exists():
        table.update(json.loads(fallback.read_text()))
    table.update(json.loads(path.read_text()))
    return table


def hourly_cost(prices: dict, deployment: dict[str, int], column: str) -> float:
    """USD per hour of ``deployment`` (instance name -> count) at price ``column``."""
    if column not in COLUMNS:
        raise ValueError(f"column={column!r}: expected one of {COLUMNS}")
    total = 0.0
    for name, count in deployment.items():
        if name not in prices or not isinstance(prices[name], dict):
            known = sorted(k for k, v in prices.items() if isinstance(v, dict) and column in v)
            raise ValueError(f"no price for instance {name!r}; priced: {', '.join(known)}")
        if count < 0:
            raise ValueError(f"deployment[{name!r}]={count}: expected >= 0")
        total += count * float(prices[name][column])
    return total


def per_dollar(goodput_rps: float, usd_per_hour: float) -> float:
    """Good requests per USD at ``goodput_rps``."""
    if usd_per_hour <= 0:
        raise ValueError(f"usd_per_hour={usd_per_hour}: a deployment must cost > 0 to be priced")
    return goodput_rps * 3600.0 / usd_per_hour
