"""Energy per request (eval/sim/energy.py) against hand-computed joules, and sim_energy.json's keys.

Powers used below come from the data files: h100-sxm 700 W busy (datasheet) and 105 W idle
(0.15 x 700, power.json's assumption); l40s 350 W / 52.5 W.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from eval.sim import energy as E
from eval.sim.cluster import ClusterSpec, DecodeSpec, PrefillSpec, simulate
from eval.sim.roofline import DecodeCost
from eval.sim.transfer import Link

ROOT = Path(__file__).resolve().parents[2]
BIG = 10**12


def test_formula_one_gpu_hand():
    # one GPU busy 2 s at 300 W and idle 8 s at 60 W over a 10 s window, 4 requests
    busy_j, idle_j = E.energy_joules(np.array([2.0]), np.array([300.0]), np.array([60.0]), 10.0)
    assert (busy_j, idle_j) == (600.0, 480.0)
    e = E.Energy(busy_j=busy_j, idle_j=idle_j, requests=4, output_tokens=54, window_s=10.0, busy_s=(2.0,))
    assert e.joules_per_request == (600.0 + 480.0) / 4
    assert e.joules_per_output_token == 1080.0 / 54


def test_formula_sums_instances_and_rejects_busy_past_the_window():
    b, i = E.energy_joules([1.0, 3.0], [700.0, 350.0], [105.0, 52.5], 4.0)
    assert b == pytest.approx(1.0 * 700 + 3.0 * 350)
    assert i == pytest.approx(3.0 * 105 + 1.0 * 52.5)
    with pytest.raises(ValueError, match="busy_s"):
        E.energy_joules([5.0], [700.0], [105.0], 4.0)
    with pytest.raises(ValueError, match="shapes differ"):
        E.energy_joules([1.0, 1.0], [700.0], [105.0], 4.0)


def test_device_power_from_the_data_files():
    h, l = E.device_power("h100-sxm"), E.device_power("l40s")
    assert (h.busy_w, h.idle_w) == (700, pytest.approx(105.0))
    assert (l.busy_w, l.idle_w) == (350, pytest.approx(52.5))
    assert E.device_power("h100-sxm", idle_fraction=0.0).idle_w == 0.0
    assert "datasheet" in h.source and "assumption" in h.source


def _spec(decode_C: list[float], max_batch_requests: int = 1 << 30) -> ClusterSpec:
    """One h100-sxm prefill at 1 ms per prompt token, one l40s decode with step cost C[batch]."""
    p = PrefillSpec(step_time=lambda new, cached, nf: 1e-3 * float(new.sum()), n_layers=1, capacity_tokens=BIG,
                    chunk_tokens=BIG, link=Link(gbps=1e9), wire_bytes_per_token=0.0,
                    max_batch_requests=max_batch_requests, name="h100-sxm")
    d = DecodeSpec(cost=DecodeCost(C=np.array(decode_C), D=0.0), capacity_tokens=BIG,
                   max_batch=len(decode_C) - 1, name="l40s")
    return ClusterSpec(prefill=(p,), decode=(d,))


def _run(spec, arrival, inp, out):
    r = simulate(spec, np.array(arrival, dtype=float), np.array(inp), np.array(out))
    return r, E.replay_energy(spec, r, np.array(out))


def test_one_request_through_the_simulator_hand():
    # prefill 1000 tokens = 1.0 s on the H100; decode 5 tokens = 4 steps of 0.05 s on the L40S; ends at 1.2 s
    r, e = _run(_spec([0.0, 0.05]), [0.0], [1000], [5])
    assert r.prefill_busy.tolist() == pytest.approx([1.0])
    assert r.decode_busy.tolist() == pytest.approx([0.2])
    assert e.window_s == pytest.approx(1.2)
    expected = (1.0 * 700 + 0.2 * 105) + (0.2 * 350 + 1.0 * 52.5)  # 843.5 J
    assert e.joules == pytest.approx(expected)
    assert e.joules_per_request == pytest.approx(expected)
    assert e.joules_per_output_token == pytest.approx(expected / 5)


def test_idle_power_is_charged_from_time_zero():
    # the same request arriving at 10 s: both GPUs idle for the first 10 s, and that is charged
    r, e = _run(_spec([0.0, 0.05]), [10.0], [1000], [5])
    assert e.window_s == pytest.approx(11.2)
    assert e.idle_j == pytest.approx(10.2 * 105 + 11.0 * 52.5)
    assert e.joules == pytest.approx(700 + 10.2 * 105 + 0.2 * 350 + 11.0 * 52.5)  # 2418.5 J
    # with idle power 0 only the busy joules remain
    assert E.replay_energy(_spec([0.0, 0.05]), r, np.array([5]), idle_fraction=0.0).joules == pytest.approx(
        700 + 0.2 * 350)


def test_decode_busy_counts_a_shared_step_once():
    # request 0 (100 tokens) is prefilled alone (0.1 s) and decoded alone (4 steps of C[1] = 0.05 s);
    # requests 1 and 2 queue behind it, share one prefill batch (2.0 s, KV lands at 2.1 s) and are
    # decoded together: 4 steps of C[2] = 0.08 s, not 8 steps
    r, e = _run(_spec([0.0, 0.05, 0.08]), [0.0, 0.0, 0.0], [100, 1000, 1000], [5, 5, 5])
    assert r.ttft.tolist() == pytest.approx([0.1, 2.1, 2.1])
    assert r.prefill_busy.tolist() == pytest.approx([2.1])
    assert r.decode_busy.tolist() == pytest.approx([0.2 + 0.32])
    assert e.window_s == pytest.approx(2.42)
    expected = (2.1 * 700 + (2.42 - 2.1) * 105) + (0.52 * 350 + (2.42 - 0.52) * 52.5)
    assert e.joules_per_request == pytest.approx(expected / 3)
    assert e.joules_per_output_token == pytest.approx(expected / 15)


def test_decode_busy_excludes_an_idle_gap():
    # one request per prefill batch: request 2's KV lands at 2.0 s, after request 1 finished at 1.2 s
    r, _ = _run(_spec([0.0, 0.05, 0.08], max_batch_requests=1), [0.0, 0.0], [1000, 1000], [5, 5])
    assert r.decode_busy.tolist() == pytest.approx([0.4])
    assert float(np.max(r.arrival + r.e2e)) == pytest.approx(2.2)


def test_pairing_ratios_hand():
    hma = {"goodput_rps": 30.0, "goodput_per_dollar_hour": 1.5, "joules_per_request": 40.0, "joules_per_output_token": 0.2}
    h100 = {"goodput_rps": 10.0, "goodput_per_dollar_hour": 0.5, "joules_per_request": 50.0, "joules_per_output_token": 0.4}
    assert E.pairing_ratios(hma, h100) == {"ratio_goodput_rps": 3.0, "ratio_goodput_per_dollar_hour": 3.0,
                                           "ratio_joules_per_request": 0.8, "ratio_joules_per_output_token": 0.5}


def _check_energy_json(out: dict) -> None:
    assert out["command"].startswith("python -m eval.sim energy")
    assert "h100-sxm: busy 700 W, idle 105 W" in out["power_source"]
    assert "l40s: busy 350 W, idle 52.5 W" in out["power_source"]
    assert (out["paper"]["goodput_ratio"], out["paper"]["goodput_per_dollar_ratio"]) == (3.2, 4.8)
    assert out["traces"]
    for tname, t in out["traces"].items():
        for s in E.PAIRING:
            x = t[s]
            for k in E.SYSTEM_KEYS:
                assert math.isfinite(x[k]) and x[k] > 0, (tname, s, k)
            assert x["goodput_per_dollar_hour"] == pytest.approx(x["goodput_rps"] / x["cost_per_hour"])
            assert x["energy_j"] == pytest.approx(x["busy_j"] + x["idle_j"])
            assert x["joules_per_request"] == pytest.approx(x["energy_j"] / x["completed_requests"])
            assert x["joules_per_output_token"] == pytest.approx(x["energy_j"] / x["output_tokens"])
            # the busy joules follow from the per-instance busy seconds and the datasheet powers
            busy = x["busy_s_per_instance"]
            assert len(busy) == x["n_prefill"] + x["n_decode"]
            watts = ([E.device_power(x["prefill"]).busy_w] * x["n_prefill"]
                     + [E.device_power(x["decode"]).busy_w] * x["n_decode"])
            assert x["busy_j"] == pytest.approx(float(np.dot(busy, watts)))
            assert all(0 < b <= x["window_s"] for b in busy)
            assert x["slo_attainment"] >= out["setup"]["attainment"]
        for k in E.SYSTEM_KEYS:
            assert t[f"ratio_{k}"] == pytest.approx(t[E.PAIRING[0]][k] / t[E.PAIRING[1]][k])


def test_committed_sim_energy_json():
    _check_energy_json(json.loads((ROOT / "eval" / "results" / "sim_energy.json").read_text()))


def test_energy_command_writes_the_keys(tmp_path):
    from eval.sim.__main__ import main

    path = tmp_path / "sim_energy.json"
    main(["energy", "--n", "60", "--traces", "azure_code", "--out", str(path)])
    out = json.loads(path.read_text())
    assert out["command"] == ("python -m eval.sim energy --model qwen3-8b --budget 24 --price on_demand "
                              "--n 60 --traces azure_code")
    _check_energy_json(out)
