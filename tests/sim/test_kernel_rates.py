"""``eval/sim/kernel_rates``: the prefill priced by kernel rates measured at each length.

The tables and TTFT files below are TEST DATA ONLY (made by the simulator from known constants):
they check the interpolation, that the fit recovers its constants and that ``extrapolate`` uses
the rates of each length, not that this box's kernels run at those rates.
"""

import json
from dataclasses import replace

import pytest

from eval.sim import extrapolate as X
from eval.sim import kernel_rates as K
from eval.sim import validate
from eval.sim.config import load_model

LENGTHS = (256, 512, 1024, 2048, 4096)
RTOL = 2e-3  # noiseless synthetic data: the fit and the replays agree to the solver's precision


def _table(model: str = "smollm2-135m") -> dict:
    """Rates that change with length, as a CPU's do (GEMMs speed up, attention slows down)."""
    rows = [{"n": n, "gemm_gflops": 40.0 + 5.0 * i, "attn_gflops": 30.0 / (1 + 0.3 * i)} for i, n in enumerate(LENGTHS)]
    return {"model": model, "dtype": "float32", "threads": 1, "reps": 3, "rows": rows}


def test_rate_at_interpolates_log_log_and_refuses_outside_the_measured_lengths():
    t = {"rows": [{"n": 256, "gemm_gflops": 10.0}, {"n": 1024, "gemm_gflops": 40.0}]}
    assert K.rate_at(t, "gemm", 256) == pytest.approx(10e9)
    assert K.rate_at(t, "gemm", 512) == pytest.approx(20e9)  # halfway in log n -> geometric mean
    with pytest.raises(ValueError, match="prompt 2048 is outside the measured kernel lengths 256..1024"):
        K.rate_at(t, "gemm", 2048)


def test_load_refuses_another_models_table(tmp_path):
    p = tmp_path / "k.json"
    p.write_text(json.dumps(_table("tiny-qwen3")))
    with pytest.raises(ValueError, match="kernel rates of model 'tiny-qwen3', the runs are 'smollm2-135m'"):
        K.load(p, load_model("smollm2-135m"))


@pytest.mark.parametrize("form,kw", [("scaled", {"factor": 1.7}), ("additive", {"per_token_s": 2e-3})])
def test_fit_recovers_overhead_and_the_forms_term(form, kw):
    tb = X.testbed(4096)
    m, base = load_model(tb["model"]), validate._base_device(tb)
    true = K.KernelPrefill(m, base, _table(), overhead_s=0.2, form=form, **kw)
    rows = [{"prompt": n, "ttft_s": true.predict_s(n)} for n in (256, 512, 1024)]
    got = K.fit(m, base, _table(), rows, form)
    assert (got.overhead_s, got.factor, got.per_token_s) == pytest.approx(
        (0.2, true.factor, true.per_token_s), rel=1e-9, abs=1e-12)
    neg = [{"prompt": n, "ttft_s": true.predict_s(n) - 0.21} for n in (256, 1024)]
    assert K.fit(m, base, _table(), neg, form).overhead_s == 0.0  # held at 0, the other term refitted
    with pytest.raises(ValueError, match="need 2 or more"):
        K.fit(m, base, _table(), rows[:1], form)
    with pytest.raises(ValueError, match="form 'cubic': expected one of additive, scaled"):
        K.fit(m, base, _table(), rows, "cubic")


@pytest.mark.parametrize("kw", [{"factor": 1.7, "form": "scaled"}, {"per_token_s": 2e-3}])
def test_device_prices_a_replayed_prefill_at_its_own_length(kw):
    tb = X.testbed(4096)
    m, base = load_model(tb["model"]), validate._base_device(tb)
    kp = K.KernelPrefill(m, base, _table(), overhead_s=0.2, **kw)
    for n in (256, 4096):
        # the replay adds the roofline's elementwise and memory terms: within 5 % of the model
        assert validate.replay_ttft(m, kp.device, "a", n, 0.0, tb) == pytest.approx(kp.predict_s(n), rel=0.05)
    flops, gemm_s = kp._gemm_s(4096)
    assert kp.device(4096).gemm_flops == pytest.approx(flops / (kp.factor * gemm_s + kp.per_token_s * 4096))


def test_extrapolate_with_kernel_rates_predicts_long_prompts(tmp_path):
    tb = X.testbed(4096)
    m, base = load_model(tb["model"]), validate._base_device(tb)
    kp = K.KernelPrefill(m, base, _table(), overhead_s=0.15, per_token_s=1.5e-3)
    links = {"stock_bf16": (0.95, 0.20), "memha_fp8_pipelined": (0.75, 0.02)}
    true = X.Fit(m, base, 0.08, 1.1, links, None, "synthetic", "config", kp)
    d = {"link_rate": "25mbit", "date": "2000-01-01T00:00:00", "reps": 3, "note": "synthetic test data"}
    for c in ("prefill_only", "pd_fp8_no_link", *links):
        for n in (256, 512, 1024, 4096):
            d[f"ttft_s_{c}_{n}"] = true.predict(tb, c, n, X.parse_tc_rate("25mbit"))
    (tmp_path / "ttft.json").write_text(json.dumps(d))
    (tmp_path / "k.json").write_text(json.dumps(_table()))
    v = X.run(tmp_path / "ttft.json", kernel_rates_path=tmp_path / "k.json")
    assert v["sim_extrapolation_prefill_model"] == "kernel_rates (additive)"
    assert v["sim_extrapolation_fit"]["kernel_per_token_s"] == pytest.approx(1.5e-3, rel=RTOL)
    assert v["sim_extrapolation_max_rel_error"] < RTOL  # the 4K points, held out
    assert {r["prompt"] for r in v["sim_extrapolation_rows"] if r["role"] == "long_prompts"} == {4096}


def test_measure_times_the_models_shapes():
    m = load_model("tiny-qwen3")
    t = K.measure(m, [8, 16], threads=1, reps=1)
    assert (t["model"], t["dtype"], [r["n"] for r in t["rows"]]) == ("tiny-qwen3", "float32", [8, 16])
    for r in t["rows"]:
        fg, fa = K.layer_flops(m, r["n"])
        assert r["gemm_gflops"] * r["gemm_s"] * 1e9 == pytest.approx(fg)
        assert r["attn_gflops"] * r["attn_s"] * 1e9 == pytest.approx(fa)
    with pytest.raises(ValueError, match="expected increasing positive token counts"):
        K.measure(m, [16, 8])
