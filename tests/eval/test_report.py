"""Results: flat keys, the goodput ratio, the markdown table, plots, the SLO calibration, the plan."""
import numpy as np
import pytest

from eval.goodput import plan, report
from eval.goodput.metrics import SLO, RequestResult
from eval.goodput.runner import Calibration, RunPoint
from eval.goodput.workload import Scaling, window
from eval.sim.trace import Trace

SLO_ = SLO(2.0, 0.1)
USD = {"on_demand": 0.10, "spot": 0.05}


def run(config, rate, n_good, n=10, trace="t"):
    res = [RequestResult(i, 100, 3, 0.0, True, ttft=1.0 if i < n_good else 3.0, latency=1.2 if i < n_good else 3.2,
                         generated=3) for i in range(n)]
    att = n_good / n
    return RunPoint(config, trace, rate, rate / 0.5, n, att, att >= 0.9, False, 10.0, res)


def test_flatten_hand_computed():
    pts = [run("stock_bf16", 1.0, 10), run("stock_bf16", 1.41, 6), run("stock_bf16", 1.19, 9)]
    flat, cdf = report.flatten("t", "stock_bf16", pts, SLO_, USD, 0.9)
    assert flat["goodput_t_stock_bf16"] == 1.19 and flat["goodput_status_t_stock_bf16"] == "bracketed"
    assert flat["goodput_multiplier_t_stock_bf16"] == pytest.approx(2.38)
    assert flat["goodput_per_dollar_on_demand_t_stock_bf16"] == pytest.approx(1.19 * 36000, rel=1e-3)
    assert flat["goodput_per_dollar_spot_t_stock_bf16"] == pytest.approx(1.19 * 72000, rel=1e-3)
    # percentiles of the goodput run (9 requests at TTFT 1.0, one at 3.0)
    assert flat["ttft_p50_s_t_stock_bf16"] == 1.0 and flat["ttft_p99_s_t_stock_bf16"] == pytest.approx(2.82)
    assert flat["tpot_p50_s_t_stock_bf16"] == pytest.approx(0.1)
    assert cdf["rate"] == 1.19 and len(cdf["ttft"]) == 10


def test_ratio_and_markdown():
    out = {"traces": ["t"], "configs": ["stock_bf16", "memha_fp8_pipelined"], "n_requests": 10,
           "window_offset_t": 0, "native_rate_t": 0.5, "slo_ttft_s_t": 2.0, "slo_tpot_s_t": 0.1}
    m = "memha_fp8_pipelined"
    for c, pts in (("stock_bf16", [run("stock_bf16", 1.0, 10), run("stock_bf16", 1.41, 5)]),
                   (m, [run(m, 1.41, 10), run(m, 2.0, 10)])):
        out.update(report.flatten("t", c, pts, SLO_, USD, 0.9)[0])
    r, kind = report.ratio(out, "t")
    assert r == pytest.approx(2.0) and kind == "lower bound"  # memha passed at the top of its range
    report.summarize(out)
    assert out["goodput_ratio"] == pytest.approx(2.0) and out["goodput_ratio_traces_at_1_5x"] == 1
    md = report.markdown_table(out)
    assert "| stock_bf16 | 1.000 |" in md and "| memha_fp8_pipelined | >= 2.000 |" in md
    assert "**2.00x** (lower bound)" in md and "TTFT <= 2.00 s, TPOT <= 100 ms" in md


def test_ratio_undefined_when_stock_has_no_goodput():
    out = {}
    out.update(report.flatten("t", "stock_bf16", [run("stock_bf16", 1.0, 2)], SLO_, USD, 0.9)[0])
    out.update(report.flatten("t", "memha_fp8_pipelined", [run("memha_fp8_pipelined", 1.0, 10),
                                                           run("memha_fp8_pipelined", 1.4, 1)], SLO_, USD, 0.9)[0])
    assert report.ratio(out, "t")[0] is None


def test_plots_are_written(tmp_path):
    out = {"traces": ["t"], "configs": ["stock_bf16"], "link_rate": "52mbit", "target_attainment": 0.9,
           "slo_ttft_s_t": 2.0, "slo_tpot_s_t": 0.1, "runs": [], "cdf": {"t": {}}}
    pts = [run("stock_bf16", 1.0, 10), run("stock_bf16", 1.41, 5)]
    flat, cdf = report.flatten("t", "stock_bf16", pts, SLO_, USD, 0.9)
    out.update(flat)
    out["cdf"]["t"]["stock_bf16"] = cdf
    out["runs"] = [{"trace": "t", "config": "stock_bf16", **p.summary(SLO_)} for p in pts]
    a, b = report.plot(out, str(tmp_path / "g.png"), str(tmp_path / "c.png"))
    assert (tmp_path / "g.png").stat().st_size > 1000 and (tmp_path / "c.png").stat().st_size > 1000


def test_calibration_gives_slos_and_a_start_rate():
    cal = Calibration(lengths=(100, 500), ttft_s=(1.0, 3.0), tpot_s=0.06, output_len=32)
    assert cal.ttft_at(300) == pytest.approx(2.0)
    slo = cal.slo(2.0, 3.0)  # k x TTFT at p90, k x TPOT
    assert slo.ttft_s == pytest.approx(6.0) and slo.tpot_s == pytest.approx(0.18)
    assert cal.capacity_estimate(np.array([100, 500])) == pytest.approx(0.5)  # 1 / mean(1, 3)
    same = Calibration(lengths=(200, 200), ttft_s=(2.0, 2.0), tpot_s=0.06, output_len=32)
    assert same.ttft_at(100) == pytest.approx(1.0)


def test_plan_estimate_is_positive_and_grows_with_configs():
    tr = Trace("t", np.arange(30.0), np.full(30, 4000), np.full(30, 200))
    wl = window(tr, 20, 0, Scaling())
    s = plan.Settings(2.0, 3.0, 1.0, 2 ** 0.5, 2 ** 0.25, 16.0, 7, 2, 0.9)
    one, _ = plan.estimate({"t": wl}, ["stock_bf16"], s)
    two, lines = plan.estimate({"t": wl}, ["stock_bf16", "memha_fp8_pipelined"], s)
    assert plan.STARTUP_S < one < two and len(lines) == 2


def test_ratio_unknown_when_both_pass_everywhere():
    out = {}
    for c in ("stock_bf16", "memha_fp8_pipelined"):
        out.update(report.flatten("t", c, [run(c, 1.0, 10), run(c, 1.41, 10)], SLO_, USD, 0.9)[0])
    r, kind = report.ratio(out, "t")
    assert r is None and kind.startswith("unknown")


def _trace_out(trace, stock_rates, memha_rates):
    m = "memha_fp8_pipelined"
    out = {"traces": [trace], "configs": ["stock_bf16", m], "n_requests": 10, "model": "x", "link_rate": "52mbit",
           "length_scale": 0.125, "k_ttft": 2.0, "k_tpot": 3.0, "target_attainment": 0.9, "command": f"run {trace}",
           "date": "d", "wall_s": 10.0, "runs": [{"trace": trace}], "cdf": {trace: {}},
           f"window_offset_{trace}": 0, f"native_rate_{trace}": 0.5, f"slo_ttft_s_{trace}": 2.0,
           f"slo_tpot_s_{trace}": 0.1}
    for c, rates in (("stock_bf16", stock_rates), (m, memha_rates)):
        pts = [run(c, r, n_good, trace=trace) for r, n_good in rates]
        out.update(report.flatten(trace, c, pts, SLO_, USD, 0.9)[0])
    return out


def test_merge_of_per_trace_runs_keeps_the_lower_ratio():
    a = _trace_out("a", [(1.0, 10), (1.41, 5)], [(1.41, 10), (2.0, 5)])  # 1.41x
    b = _trace_out("b", [(1.0, 10), (1.41, 5)], [(1.0, 10), (1.41, 10), (2.0, 10)])  # >= 2x
    out = report.merge([a, b])
    report.summarize(out)
    assert out["traces"] == ["a", "b"] and len(out["runs"]) == 2 and set(out["cdf"]) == {"a", "b"}
    assert out["goodput_ratio_a"] == pytest.approx(1.41) and out["goodput_ratio_b"] == pytest.approx(2.0)
    assert out["goodput_ratio"] == pytest.approx(1.41) and out["goodput_ratio_traces_at_1_5x"] == 1
    assert out["command"] == "run a ; run b" and out["wall_s"] == 20.0
    assert "**b**" in report.markdown_table(out)


def test_merge_refuses_different_settings_or_a_repeated_trace():
    a = _trace_out("a", [(1.0, 10)], [(1.0, 10)])
    with pytest.raises(ValueError, match="k_ttft differs"):
        report.merge([a, {**_trace_out("b", [(1.0, 10)], [(1.0, 10)]), "k_ttft": 4.0}])
    with pytest.raises(ValueError, match=r"trace\(s\) \['a'\]"):
        report.merge([a, _trace_out("a", [(1.0, 10)], [(1.0, 10)])])


def test_repeats_keep_the_lowest_ratio_over_runs_and_traces():
    a = _trace_out("a", [(1.0, 10), (1.41, 5)], [(1.41, 10), (2.0, 5)])  # 1.41x
    a2 = _trace_out("a", [(1.0, 10), (1.41, 5)], [(1.0, 10), (1.41, 10), (2.0, 10), (2.83, 5)])  # 2.0x
    out = report.repeats([a, a2], ["r1", "r2"])
    assert out["goodput_ratio_r1_a"] == pytest.approx(1.41) and out["goodput_ratio_r2"] == pytest.approx(2.0)
    assert out["goodput_ratio"] == pytest.approx(1.41) and out["runs_from"] == ["r1", "r2"]
    with pytest.raises(ValueError, match="k_tpot differs in r2"):
        report.repeats([a, {**a2, "k_tpot": 4.0}], ["r1", "r2"])
    undefined = _trace_out("a", [(1.0, 2)], [(1.0, 10), (1.41, 1)])  # stock has no goodput
    with pytest.raises(ValueError, match="r2: no defined goodput ratio"):
        report.repeats([a, undefined], ["r1", "r2"])
