"""Goodput ratio across trace windows: per-window ratios, bootstrap bounds, exclusions, the CLI."""
import json

import numpy as np
import pytest

from eval.goodput import confidence, windows
from eval.goodput.__main__ import main

M, S = "memha_fp8_pipelined", "stock_bf16"
SETTINGS = {"model": "SmolLM2-135M-Instruct", "link_rate": "52mbit", "n_requests": 20, "length_scale": 0.125,
            "k_ttft": 2.0, "k_tpot": 3.0, "target_attainment": 0.9, "prefill_threads": 1, "decode_threads": 1,
            "max_input": 2048, "max_output": 32}


def window(trace, offset, stock, memha, stock_status="bracketed", memha_status="bracketed", config=M):
    """A results JSON of one trace window, as ``python -m eval.goodput`` writes its keys."""
    return {**SETTINGS, "traces": [trace], "configs": [S, config], f"window_offset_{trace}": offset,
            f"goodput_{trace}_{S}": stock, f"goodput_status_{trace}_{S}": stock_status,
            f"goodput_{trace}_{config}": memha, f"goodput_status_{trace}_{config}": memha_status}


def ratios_of(trace, rs, offsets=None):
    """Windows of ``trace`` whose memha / stock ratios are ``rs`` (stock 0.2 req/s)."""
    offsets = offsets or [1000 * i for i in range(len(rs))]
    return [window(trace, o, 0.2, 0.2 * r) for o, r in zip(offsets, rs)]


def summary(parts, **kw):
    return confidence.summarize_windows(parts, [f"f{i}" for i in range(len(parts))], **kw)


def test_window_ratios_exact():
    parts = [window("a", 200, 0.2, 0.8), window("a", 0, 0.2, 0.5), window("a", 100, 0.4, 0.6)]
    both = window("b", 0, 0.25, 0.5)  # one file with two traces, as a default run writes
    both.update({k: v for k, v in window("c", 0, 0.1, 0.3).items() if k not in SETTINGS and k != "configs"})
    both["traces"] = ["b", "c"]
    included, excluded = confidence.window_ratios(parts + [both], ["w200", "w0", "w100", "bc"])
    assert [(w["offset"], w["ratio"]) for w in included["a"]] == [(0, 2.5), (100, 1.5), (200, 4.0)]
    assert included["a"][0] == {"offset": 0, "n": 20, "ratio": 2.5, "kind": "measured", "from": ["w0"]}
    assert included["b"][0]["ratio"] == 2.0 and included["c"][0]["ratio"] == 3.0 and excluded == {}


def test_equal_ratios_give_a_point_interval():
    out = summary(ratios_of("a", [2.0, 2.0, 2.0]))
    assert out["goodput_ratio_gmean_a"] == out["goodput_ratio_ci_low_a"] == out["goodput_ratio_ci_high_a"] == 2.0
    assert out["goodput_ratio_ci_low"] == 2.0 and "goodput_ci_warning_a" not in out
    assert [w["ratio"] for w in out["goodput_ratio_windows_a"]] == [2.0, 2.0, 2.0]


def test_two_windows_hand_computed():
    # resamples of [1, 4]: (1,1) -> 1 w.p. 1/4, (1,4)/(4,1) -> 2 w.p. 1/2, (4,4) -> 4 w.p. 1/4: the 5th
    # percentile lies in the block of 1s, the 95th in the block of 4s
    out = summary(ratios_of("a", [1.0, 4.0]))
    point = (out["goodput_ratio_gmean_a"], out["goodput_ratio_ci_low_a"], out["goodput_ratio_ci_high_a"])
    assert point == (2.0, 1.0, 4.0)
    assert "2 window(s)" in out["goodput_ci_warning_a"] and "not meaningful" in out["goodput_ci_warning_a"]


def test_three_windows_quantiles_known():
    # [1, 2, 4] = 2^[0, 1, 2]: a resample's gmean is 2^(sum / 3). P(sum = 0) = 1/27 = 3.7 % < 5 % <
    # P(sum <= 1) = 4/27, so the 5th percentile is 2^(1/3); by symmetry the 95th is 2^(5/3)
    out = summary(ratios_of("a", [1.0, 2.0, 4.0]))
    assert out["goodput_ratio_gmean_a"] == 2.0
    assert out["goodput_ratio_ci_low_a"] == round(2 ** (1 / 3), 4)
    assert out["goodput_ratio_ci_high_a"] == round(2 ** (5 / 3), 4)
    assert out["goodput_ratio_traces_ci_low_at_1_5x"] == 0  # 1.26 < 1.5


def test_bootstrap_is_seeded_and_ordered():
    rs = [1.2, 1.9, 2.5, 3.1]
    a = confidence.bootstrap_gmeans(rs, confidence.trace_rng(22, "t"))
    b = confidence.bootstrap_gmeans(rs, confidence.trace_rng(22, "t"))
    assert np.array_equal(a, b) and a.shape == (confidence.N_RESAMPLES,)
    lo, hi = confidence.interval(a)
    assert min(rs) <= lo < confidence.gmean(rs) < hi <= max(rs)


def test_stratified_overall_hand_computed():
    # overall replicate = sqrt(9 x g_b), g_b in {1, 2, 4} w.p. 1/4, 1/2, 1/4 (trace b's two windows)
    out = summary(ratios_of("a", [9.0, 9.0, 9.0]) + ratios_of("b", [1.0, 4.0]))
    assert out["goodput_ratio_gmean"] == round(18 ** 0.5, 4)
    assert (out["goodput_ratio_ci_low"], out["goodput_ratio_ci_high"]) == (3.0, 6.0)
    assert out["goodput_ratio_ci_traces"] == ["a", "b"] and out["goodput_ratio_traces_ci_low_at_1_5x"] == 1


def test_trace_weights_are_equal_whatever_its_window_count():
    few = summary(ratios_of("a", [4.0, 4.0, 4.0]) + ratios_of("b", [1.0] * 3))
    many = summary(ratios_of("a", [4.0, 4.0, 4.0]) + ratios_of("b", [1.0] * 9))
    assert few["goodput_ratio_gmean"] == many["goodput_ratio_gmean"] == 2.0


def test_exclusions_are_listed_with_reasons():
    parts = [window("a", 0, 0.2, 0.6),
             window("a", 100, 0.0, 0.5, stock_status="none"),  # stock goodput 0: ratio undefined
             window("a", 200, 0.4, 0.6, stock_status="lower_bound"),  # the true ratio may be lower
             window("a", 300, 0.4, 0.8, "lower_bound", "lower_bound"),  # neither search bracketed
             window("a", 400, 0.2, 0.8, memha_status="lower_bound"),  # ratio >= 4: kept (conservative)
             window("a", 500, 0.2, 0.4, config="memha_int4_pipelined")]  # no memha_fp8_pipelined run
    out = summary(parts)
    assert [(w["offset"], w["ratio"], w["kind"]) for w in out["goodput_ratio_windows_a"]] == [
        (0, 3.0, "measured"), (400, 4.0, "lower bound")]
    reasons = {e["offset"]: e["reason"] for e in out["goodput_ratio_excluded_a"]}
    assert sorted(reasons) == [100, 200, 300, 500]
    assert "stock goodput 0" in reasons[100] and "upper bound" in reasons[200]
    assert "both passed" in reasons[300] and "no goodput for memha_fp8_pipelined" in reasons[500]
    assert out["goodput_ratio_gmean_a"] == round(12 ** 0.5, 4)


def test_named_config_and_memha_without_goodput():
    parts = [window("a", o, 0.2, g, config="memha_int4_pipelined", memha_status=st)
             for o, g, st in ((0, 0.4, "bracketed"), (100, 0.6, "bracketed"), (200, 0.0, "none"))]
    out = summary(parts, memha="memha_int4_pipelined")
    assert [w["ratio"] for w in out["goodput_ratio_windows_a"]] == [2.0, 3.0, 0.0]
    # a window where memha met the SLO at no tested rate counts as ratio 0: the mean is 0, not skipped
    assert out["goodput_ratio_gmean_a"] == 0.0 and out["goodput_ratio_ci_low_a"] == 0.0
    assert out["memha_config"] == "memha_int4_pipelined"


def test_trace_with_no_defined_window():
    out = summary(ratios_of("a", [2.0, 2.0, 2.0]) + [window("b", 0, 0.0, 0.3, stock_status="none")])
    assert out["goodput_ratio_gmean_b"] is None and out["goodput_ratio_ci_low_b"] is None
    assert "no window" in out["goodput_ci_warning_b"] and out["goodput_ratio_ci_traces"] == ["a"]
    assert out["goodput_ratio_ci_low"] == 2.0


def test_repeats_of_one_window_count_once():
    included, _ = confidence.window_ratios([window("a", 0, 0.2, 0.4), window("a", 0, 0.1, 0.8)], ["x", "y"])
    assert included["a"] == [{"offset": 0, "n": 20, "ratio": 4.0, "kind": "measured", "from": ["x", "y"]}]


def test_windows_of_different_experiments_refused():
    other = {**window("a", 100, 0.2, 0.4), "n_requests": 40}
    with pytest.raises(ValueError, match="n_requests differs"):
        summary([window("a", 0, 0.2, 0.4), other])


def test_cli_merge_writes_keys_table_and_plot(tmp_path, capsys):
    paths = []
    for i, p in enumerate(ratios_of("azure_code", [1.6, 2.0, 2.5]) + ratios_of("azure_conv", [1.8, 2.2, 3.0])):
        paths.append(tmp_path / f"w{i}.json")
        paths[-1].write_text(json.dumps(p))
    main(["--windows-from", *map(str, paths), "--out", str(tmp_path / "goodput_windows.json"), "--bootstrap", "2000"])
    out = json.loads((tmp_path / "goodput_windows.json").read_text())
    for key in ("goodput_ratio_ci_low", "goodput_ratio_ci_low_azure_code", "goodput_ratio_ci_high_azure_conv",
                "goodput_ratio_gmean_azure_conv", "goodput_ratio_windows_azure_code",
                "goodput_ratio_traces_ci_low_at_1_5x", "goodput_ci_method"):
        assert key in out, key
    assert out["bootstrap_resamples"] == 2000 and len(out["windows_from"]) == 6
    assert out["goodput_ratio_ci_low_azure_code"] >= 1.6 and out["goodput_ratio_traces_ci_low_at_1_5x"] == 2
    assert (tmp_path / "goodput_windows.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "| azure_code | 3 | 1.60 @0, 2.00 @1000, 2.50 @2000 |" in printed
    assert printed.strip().endswith("goodput_windows.png")
    assert (tmp_path / "goodput_windows_summary.md").read_text().startswith(out["memha_config"])


def test_windows_plan_skips_finished_files_and_prints_the_estimate(tmp_path, capsys):
    (tmp_path / "goodput_azure_code_w0.json").write_text(json.dumps({"wall_s": 1.0}))
    (tmp_path / "goodput_azure_code_w500.json").write_text(json.dumps({}))  # stopped mid-run: redo
    plan = windows.plan_windows(["azure_code", "azure_conv"], 3, 500, 0, str(tmp_path))
    assert [(w.trace, w.offset, w.done) for w in plan] == [
        ("azure_code", 0, True), ("azure_code", 500, False), ("azure_code", 1000, False),
        ("azure_conv", 0, False), ("azure_conv", 500, False), ("azure_conv", 1000, False)]
    main(["--windows", "3", "--window-stride", "500", "--traces", "azure_code,azure_conv", "--configs",
          f"{S},{M}", "--plan-only", "--out", str(tmp_path / "goodput_windows.json")])
    printed = capsys.readouterr().out
    assert "5 of 6 to run" in printed and "estimated wall time of what is left" in printed
    assert "goodput_azure_conv_w1000.json" in printed and "done (goodput_azure_code_w0.json)" in printed


def test_windows_plan_refuses_overlap_and_windows_past_the_trace(tmp_path):
    with pytest.raises(SystemExit):
        main(["--windows", "3", "--window-stride", "10", "--n", "20", "--plan-only"])
    with pytest.raises(SystemExit, match="has 8819 requests"):
        main(["--windows", "3", "--window-stride", "5000", "--traces", "azure_code", "--plan-only",
              "--out", str(tmp_path / "w.json")])
