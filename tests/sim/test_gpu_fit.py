"""The GPU calibration of the simulator: eval.sim.gpu_measure (CPU smoke run) and eval.sim.gpu_fit.

The fit is checked on rows synthesised from the roofline itself with known factors (a 6 us kernel
latency among them) and +-3 % deterministic noise: it must recover the factors within 10 % and
predict the held-out steps within 10 %,
while the unfitted assumptions of efficiency.json miss them by more.
"""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from eval.sim import gpu_fit, roofline
from eval.sim.config import DATA_DIR, load_device, load_model

TRUTH = {"gemm_eff": 0.5, "attn_prefill_eff": 0.35, "attn_decode_eff": 0.3, "mem_eff": 0.93, "kernel_latency_s": 6e-6}
PREFILL, BATCHES, CTXS, FORMATS = (1024, 2048, 4096, 8192), (1, 8, 64), (1024, 8192, 32768), ("bf16", "fp8_e4m3")


def synthetic(hw="h100-sxm", factors=TRUTH, noise=0.03) -> dict:
    m, dev = load_model("qwen3-8b"), replace(load_device(hw), **factors)
    rows, k = [], 0

    def jitter():
        nonlocal k
        k += 1
        return 1 + noise * (1 if k % 2 else -1) * ((k % 3) / 2)

    for n in (*PREFILL, *BATCHES):
        g = float(roofline.gemm_time(m, dev, n))
        rows += [{"kind": "gemm", "op": op, "tokens": n, "s": g / 4 * jitter()}
                 for op in ("qkv_proj", "o_proj", "gate_up", "down")]
    for n in PREFILL:
        s = roofline.prefill_attention_time(m, dev, np.array([n]), np.array([0]))
        rows.append({"kind": "attn_prefill", "tokens": n, "s": s * jitter()})
    for fmt in FORMATS:
        for b in BATCHES:
            for c in CTXS:
                s = b * c * roofline.decode_attention_time_per_token(m, dev, fmt) + dev.kernel_latency_s
                rows.append({"kind": "attn_decode", "format": fmt, "batch": b, "ctx": c, "impl": "memha_triton",
                             "s": s * jitter()})
    return {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-08", "torch": "2.11", "triton": "3.6",
            "model": "qwen3-8b", "copy_gbps": 2900.0, "rows": rows,
            "power": {"idle_w": 110.0, "prefill_w": 640.0, "decode_w": 420.0}}


def test_fit_recovers_factors_and_predicts_held_out_steps():
    meas = synthetic()
    factors = gpu_fit.fit(meas, "h100-sxm")
    for f in ("gemm_eff", "attn_prefill_eff", "mem_eff", "kernel_latency_s"):
        assert factors[f] == pytest.approx(TRUTH[f], rel=0.1), f
    ev = gpu_fit.evaluate(meas, "h100-sxm", factors)
    assert ev["held_out_steps"] == 2 + 2 * 5  # prefill 4K, 8K; per format (1|8, 32K) and (64, 1K|8K|32K)
    assert ev["sim_gpu_step_rel_error"] < 0.10
    r = ev["steps"][0]
    assert r["rel_error"] == pytest.approx(abs(r["predicted_s"] - r["measured_s"]) / r["measured_s"])
    # the same steps under the unfitted assumptions are off by more: the fit is what the error measures
    prior = {f: getattr(load_device("h100-sxm"), f) for f in gpu_fit.FACTORS}
    assert gpu_fit.evaluate(meas, "h100-sxm", prior)["sim_gpu_step_rel_error"] > 0.15


def test_split_is_fixed_by_shape():
    assert gpu_fit.is_calibration({"kind": "gemm", "tokens": 8})
    assert gpu_fit.is_calibration({"kind": "gemm", "tokens": 2048})
    assert not gpu_fit.is_calibration({"kind": "gemm", "tokens": 64})
    assert not gpu_fit.is_calibration({"kind": "attn_prefill", "tokens": 4096})
    assert gpu_fit.is_calibration({"kind": "attn_decode", "batch": 8, "ctx": 8192})
    assert not gpu_fit.is_calibration({"kind": "attn_decode", "batch": 8, "ctx": 32768})


def test_bad_measurements_name_the_row_and_the_fix():
    meas = synthetic()
    meas["rows"] = [r for r in meas["rows"] if not (r["kind"] == "gemm" and r["op"] == "down" and r["tokens"] == 1)]
    with pytest.raises(ValueError, match=r"gemm rows at tokens=1 have ops \['gate_up', 'o_proj', 'qkv_proj'\]"):
        gpu_fit.fit(meas, "h100-sxm")
    meas = synthetic()
    meas["rows"][-1]["s"] = float("nan")
    with pytest.raises(ValueError, match="s=nan: expected a positive number of seconds"):
        gpu_fit.fit(meas, "h100-sxm")
    meas = synthetic()
    meas["rows"] = [r for r in meas["rows"] if r["kind"] != "attn_prefill"]
    with pytest.raises(ValueError, match="calibration rows cover \\['attn_decode', 'gemm'\\]"):
        gpu_fit.fit(meas, "h100-sxm")


def test_gpu_names_map_to_hardware_entries():
    assert gpu_fit.hw_name("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert gpu_fit.hw_name("NVIDIA H200") == "h200-sxm"
    with pytest.raises(ValueError, match="no hardware.json entry known for GPU 'Tesla T4'; pass --hw NAME"):
        gpu_fit.hw_name("Tesla T4")


def test_write_records_factors_and_power_with_provenance(tmp_path, monkeypatch):
    for name in ("efficiency.json", "power.json"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    monkeypatch.setattr(gpu_fit, "DATA_DIR", tmp_path)
    meas = synthetic()
    mfile = tmp_path / "m.json"
    mfile.write_text(json.dumps(meas))
    out = gpu_fit.main([str(mfile), "--write", "--out", str(tmp_path / "sim_gpu.json")])
    eff = json.loads((tmp_path / "efficiency.json").read_text())["h100-sxm"]
    assert out["factors_not_identified"] == ["attn_decode_eff"]  # every decode row here is memory-bound
    written = {f: v for f, v in out["factors"].items() if f != "attn_decode_eff"}
    assert {f: eff[f] for f in written} == written and "attn_decode_eff" not in eff
    assert "measured on NVIDIA H100 80GB HBM3 2026-12-08" in eff["sources"]["gemm_eff"]
    power = json.loads((tmp_path / "power.json").read_text())["devices"]["h100-sxm"]
    assert (power["idle_w"], power["busy_prefill_w"], power["busy_decode_w"]) == (110.0, 640.0, 420.0)
    saved = json.loads((tmp_path / "sim_gpu.json").read_text())
    assert saved["sim_gpu_step_rel_error"] == out["sim_gpu_step_rel_error"]


def test_measure_runs_on_cpu_without_power(tmp_path):
    from eval.sim import gpu_measure

    res = gpu_measure.main(["--device", "cpu", "--quick", "--model", "smollm2-135m", "--out", str(tmp_path / "m.json")])
    kinds = {r["kind"] for r in res["rows"]}
    assert kinds == {"gemm", "attn_prefill", "attn_decode", "copy"}
    assert all(r["s"] > 0 for r in res["rows"])
    assert [r["impl"] for r in res["rows"] if r["kind"] == "attn_decode"] == ["sdpa_dense"] * 2
    assert res["power"] == {"idle_w": None, "prefill_w": None, "decode_w": None, "reason": "not a CUDA run"}
    assert json.loads((tmp_path / "m.json").read_text())["rows"] == res["rows"]
