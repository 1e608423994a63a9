"""``python -m eval.sim extrapolate``: fit on short prompts at one link rate, predict the rest.

The synthetic measurements below are TEST DATA ONLY, made by the simulator itself from known
constants (``TRUE``): they check that the fit recovers those constants and that held-out points
are predicted, not that the model is right about this box.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from eval.sim import extrapolate as X
from eval.sim import validate
from eval.sim.__main__ import kept_keys, main
from eval.sim.config import load_model

ROOT = Path(__file__).resolve().parents[2]
TTFT_JSON = ROOT / "eval" / "results" / "ttft.json"
CONFIGS = ("prefill_only", "pd_fp8_no_link", "stock_bf16", "memha_bf16_whole", "memha_fp8_whole",
           "memha_fp8_pipelined", "memha_bf16_pipelined")
TRUE_LINKS = {"stock_bf16": (0.95, 0.20), "memha_bf16_whole": (0.90, 0.10), "memha_fp8_whole": (0.80, 0.05),
              "memha_fp8_pipelined": (0.75, 0.02), "memha_bf16_pipelined": (0.85, 0.30)}
# recovered constants and held-out predictions of a noiseless synthetic run: relative tolerance
RTOL = 2e-3


def _true_fit(tb: dict) -> X.Fit:
    dev = replace(validate._base_device(tb), bf16_tflops=0.125, attn_tflops=0.070, prefill_step_overhead_s=0.02)
    return X.Fit(load_model(tb["model"]), dev, handoff_s=0.08, slowdown=1.1, links=TRUE_LINKS,
                 attn_ratio=None, attn_ratio_source="synthetic")


def _synthetic(path: Path, rate: str, lengths: tuple[int, ...]) -> Path:
    """A bench_ttft-shaped file made by the simulator from ``_true_fit`` (test data only)."""
    tb = X.testbed(max(lengths))
    ft = _true_fit(tb)
    d = {"link_rate": rate, "date": "2000-01-01T00:00:00", "reps": 3, "note": "synthetic test data"}
    for c in CONFIGS:
        for n in lengths:
            d[f"ttft_s_{c}_{n}"] = ft.predict(tb, c, n, X.parse_tc_rate(rate))
    path.write_text(json.dumps(d))
    return path


def test_parse_tc_rate():
    assert X.parse_tc_rate("52mbit") == pytest.approx(0.052)
    assert X.parse_tc_rate("1gbit") == pytest.approx(1.0)
    assert X.parse_tc_rate("10mbps") == pytest.approx(0.08)  # tc: bytes per second
    with pytest.raises(ValueError, match="link rate"):
        X.parse_tc_rate("fast")


def test_config_kind_follows_pd_configs():
    assert X.config_kind("prefill_only") == ("a", "bf16", False)
    assert X.config_kind("pd_fp8_no_link") == ("b", "fp8_e4m3", False)
    assert X.config_kind("stock_bf16") == ("c", "bf16", False)
    assert X.config_kind("memha_fp8_pipelined") == ("c", "fp8_e4m3", True)
    with pytest.raises(ValueError, match="PD_CONFIGS"):
        X.config_kind("nope")


@pytest.mark.parametrize("link_groups", ["config", "schedule"])
def test_synthetic_constants_recovered_and_held_out_predicted(tmp_path, link_groups):
    lengths = (256, 512, 1024, 2048, 4096)
    calib = _synthetic(tmp_path / "a.json", "52mbit", lengths)
    other = _synthetic(tmp_path / "b.json", "30mbit", lengths)
    v = X.run(calib, other, short_max=1024, link_groups=link_groups)
    fit = v["sim_extrapolation_fit"]
    assert fit["gemm_gflops"] == pytest.approx(125.0, rel=RTOL)
    assert fit["attn_prefill_gflops"] == pytest.approx(70.0, rel=RTOL)
    assert fit["prefill_overhead_s"] == pytest.approx(0.02, rel=RTOL)
    assert fit["pd_handoff_s"] == pytest.approx(0.08, rel=RTOL)
    assert fit["pd_prefill_slowdown"] == pytest.approx(1.1, rel=RTOL)
    if link_groups == "config":  # per-schedule groups mix two true constants: only predictions checked
        for c, (eta, lat) in TRUE_LINKS.items():
            assert fit[f"link_{c}_eta"] == pytest.approx(eta, rel=RTOL), c
            assert fit[f"link_{c}_latency_s"] == pytest.approx(lat, rel=RTOL, abs=1e-3), c
        assert v["sim_extrapolation_max_rel_error"] < RTOL
        assert v["sim_extrapolation_calibration_max_rel_error"] < RTOL
    roles = {r["role"] for r in v["sim_extrapolation_rows"]}
    assert roles == {"calibration", "long_prompts", "other_rate"}
    assert v["sim_extrapolation_points"] == len(CONFIGS) * (2 + len(lengths))
    assert set(v["sim_extrapolation_max_rel_error_by_config"]) == set(CONFIGS)


def test_two_short_lengths_need_the_attention_ratio(tmp_path):
    calib = _synthetic(tmp_path / "a.json", "52mbit", (256, 1024, 4096))
    v = X.run(calib, short_max=1024, attn_ratio=125.0 / 70.0)
    fit = v["sim_extrapolation_fit"]
    assert fit["attn_ratio_source"] == "given"
    assert fit["gemm_gflops"] == pytest.approx(125.0, rel=RTOL)
    assert v["sim_extrapolation_max_rel_error_long_prompts"] < RTOL
    with pytest.raises(ValueError, match="3 unknowns need 3"):
        validate.fit_prefill(load_model("smollm2-135m"), validate._base_device(X.testbed(4096)),
                             [{"prompt": 256, "ttft_s": 0.5}, {"prompt": 1024, "ttft_s": 2.0}], X.testbed(4096))


@pytest.mark.skipif(not TTFT_JSON.exists(), reason="no eval/results/ttft.json")
def test_fit_reproduces_its_calibration_points_on_the_measured_file():
    """On the measured file: prefill-only and the loopback PD endpoints are fitted exactly (<= 2 %;
    a negative overhead is clamped at 0, then prefill-only is least squares); the shaped-link
    points are a 2-parameter least-squares fit per config: <= 30 % (fp8 pipelined's 256 and 512
    points of the 52mbit run differ 25 % and 22 % from any line in bytes)."""
    v = X.run(TTFT_JSON, short_max=1024)
    cal = [r for r in v["sim_extrapolation_rows"] if r["role"] == "calibration"]
    for r in cal:
        assert r["rel_error"] <= 0.30, r
    short = sorted(r["prompt"] for r in cal if r["config"] == "pd_fp8_no_link")
    for r in cal:
        if r["config"] == "prefill_only" or (r["config"] == "pd_fp8_no_link" and r["prompt"] in (short[0], short[-1])):
            assert r["rel_error"] <= 0.02, r


def test_cli_writes_the_keys_and_keeps_the_others(tmp_path, monkeypatch):
    import eval.sim.__main__ as cli

    lengths = (256, 512, 1024, 4096)
    calib = _synthetic(tmp_path / "a.json", "52mbit", lengths)
    other = _synthetic(tmp_path / "b.json", "30mbit", lengths)
    monkeypatch.setattr(cli, "RESULTS", tmp_path)
    (tmp_path / "sim.json").write_text(json.dumps({"sim_max_rel_error": 0.1, "sim_extrapolation_stale": 1}))
    main(["extrapolate", "--calib", str(calib), "--other", str(other), "--write"])
    sim = json.loads((tmp_path / "sim.json").read_text())
    assert sim["sim_max_rel_error"] == 0.1
    assert "sim_extrapolation_stale" not in sim
    for k in ("sim_extrapolation_max_rel_error", "sim_extrapolation_max_rel_error_long_prompts",
              "sim_extrapolation_max_rel_error_other_rate", "sim_extrapolation_rows", "sim_extrapolation_fit"):
        assert k in sim, k
    assert sim["sim_extrapolation_command"] == f"python -m eval.sim extrapolate --calib {calib} --other {other} --write"
    assert sim["sim_extrapolation_inputs"]["calib"]["date"] == "2000-01-01T00:00:00"
    assert sim["sim_extrapolation_inputs"]["other"]["link_rate"] == "30mbit"
    assert set(kept_keys(tmp_path / "sim.json")) == {k for k in sim if k.startswith("sim_extrapolation_")}
