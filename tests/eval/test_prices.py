"""Goodput per dollar: price lookup (own table, then the simulator's) and the arithmetic."""
import json

import pytest

from eval.goodput.prices import PRICES, hourly_cost, load_prices, per_dollar


def test_per_dollar_hand_computed():
    # 0.5 good req/s for an hour = 1800 requests, at $0.10/h -> 18000 requests per dollar
    assert per_dollar(0.5, 0.10) == pytest.approx(18000)
    assert per_dollar(0.0, 0.10) == 0.0
    with pytest.raises(ValueError, match="usd_per_hour"):
        per_dollar(1.0, 0.0)


def test_hourly_cost_sums_the_deployment(tmp_path):
    own = tmp_path / "p.json"
    own.write_text(json.dumps({"deployment": {"box": 1}, "box": {"on_demand": 0.2, "spot": 0.05}}))
    sim = tmp_path / "sim.json"
    sim.write_text(json.dumps({"gpu": {"on_demand": 3.0, "spot": 1.0}, "box": {"on_demand": 99, "spot": 99}}))
    prices = load_prices(own, sim)
    assert prices["box"]["on_demand"] == 0.2  # own table overrides the simulator's
    assert hourly_cost(prices, {"box": 2, "gpu": 1}, "on_demand") == pytest.approx(3.4)
    assert hourly_cost(prices, {"box": 2, "gpu": 1}, "spot") == pytest.approx(1.1)
    with pytest.raises(ValueError, match="no price for instance 'tpu'.*box"):
        hourly_cost(prices, {"tpu": 1}, "spot")
    with pytest.raises(ValueError, match="column"):
        hourly_cost(prices, {"box": 1}, "reserved")


def test_shipped_table_prices_the_testbed_and_reaches_the_gpu_table():
    prices = load_prices()
    dep = json.loads(PRICES.read_text())["deployment"]
    for col in ("on_demand", "spot"):
        assert hourly_cost(prices, dep, col) > 0
    assert hourly_cost(prices, dep, "spot") <= hourly_cost(prices, dep, "on_demand")
    assert hourly_cost(prices, {"h100-sxm": 1}, "on_demand") > 0  # from eval/sim/data/prices.json
