"""Fit the simulator's efficiency factors to ``gpu_measure`` rows, and predict shapes it did not see.

    python -m eval.sim.gpu_fit MEASURED.json [--hw h100-sxm] [--write] [--out eval/results/sim_gpu.json]

Model (the simulator's own, ``roofline``): for one layer of the measured model on device ``--hw``
    gemm rows           sum of the four GEMMs at N rows     = ``roofline.gemm_time``
    attn_prefill rows   causal attention over N new tokens  = ``roofline.prefill_attention_time``
    attn_decode rows    batch B x context C on a FMT pool   = B * C * ``decode_attention_time_per_token``
each a max(FLOPs / (peak x eff), bytes / (bandwidth x mem_eff)) plus ``kernel_latency_s`` per
kernel call (the floor that batch-1 GEMMs and short decode contexts hit). FITTED: ``gemm_eff``,
``attn_prefill_eff``, ``attn_decode_eff``, ``mem_eff`` (in [0.005, 1]) and ``kernel_latency_s``
(0-50 us): scipy's Powell minimising the squared log error over the CALIBRATION rows only, from
the prior factors with three starting latencies (the best kept).

Split (fixed before any measurement): calibration = prefill N <= 2048, decode B <= 8 with C <= 8192;
held out = prefill N >= 4096, decode B = 64 or C = 32768. A "step" is one layer's GEMMs plus its
attention at one shape (prefill N; decode B, C, FMT), measured as the sum of the measured parts.
``sim_gpu_step_rel_error`` = the largest |predicted - measured| / measured over held-out steps.
Not measured, so not fitted: norms, RoPE, the LM head and the per-step software overheads
(``efficiency.json`` keeps its assumptions for those).

``--write`` puts the five fitted values into ``data/efficiency.json`` under the device, with their
provenance (GPU name, date, command, error), and the measured idle / busy board power into
``data/power.json``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from . import roofline
from .config import DATA_DIR, load_device, load_model

RESULTS = Path(__file__).resolve().parents[1] / "results"
# what is fitted, within these bounds: four fractions of peak, and the fixed time of one kernel
BOUNDS = {"gemm_eff": (0.005, 1.0), "attn_prefill_eff": (0.005, 1.0), "attn_decode_eff": (0.005, 1.0),
          "mem_eff": (0.005, 1.0), "kernel_latency_s": (0.0, 50e-6)}
FACTORS = tuple(BOUNDS)
LATENCY_STARTS = (0.0, 5e-6, 20e-6)  # the optimiser starts from the prior effs at each of these
CALIB_PREFILL_MIN, CALIB_PREFILL_MAX = 1024, 2048
CALIB_BATCH_MAX, CALIB_CTX_MAX = 8, 8192
HW_BY_GPU_NAME = (("H200", "h200-sxm"), ("H100", "h100-sxm"), ("H20", "h20"), ("L40S", "l40s"), ("L20", "l20"),
                  ("MI300X", "mi300x"), ("RTX 4090", "rtx4090"), ("RTX 5090", "rtx5090"))


def hw_name(gpu_name: str) -> str:
    """``hardware.json`` entry for a ``torch.cuda.get_device_name()`` string."""
    for key, hw in HW_BY_GPU_NAME:
        if key in gpu_name.upper():
            return hw
    raise ValueError(f"gpu_fit: no hardware.json entry known for GPU {gpu_name!r}; pass --hw NAME "
                     f"(one of hardware.json's devices)")


def is_calibration(row: dict) -> bool:
    """The fixed split of the module docstring (gemm rows: N is a decode batch or a prefill length)."""
    if row["kind"] == "attn_decode":
        return row["batch"] <= CALIB_BATCH_MAX and row["ctx"] <= CALIB_CTX_MAX
    n = row["tokens"]
    return n <= CALIB_BATCH_MAX or CALIB_PREFILL_MIN <= n <= CALIB_PREFILL_MAX


def _gemm_sums(rows: list[dict]) -> dict[int, float]:
    """Measured seconds of the four GEMMs of one layer, per row count N (all four must be there)."""
    per_n: dict[int, dict[str, float]] = {}
    for r in rows:
        if r["kind"] == "gemm":
            per_n.setdefault(int(r["tokens"]), {})[r["op"]] = float(r["s"])
    for n, ops in per_n.items():
        if len(ops) != 4:
            raise ValueError(f"gpu_fit: gemm rows at tokens={n} have ops {sorted(ops)}; expected the four "
                             f"qkv_proj, o_proj, gate_up, down (rerun eval.sim.gpu_measure)")
    return {n: sum(ops.values()) for n, ops in per_n.items()}


def targets(measured: dict) -> list[dict]:
    """One entry per fitted quantity: {"kind", shape keys, "s" measured, "calib" bool}."""
    rows = measured["rows"]
    out = [{"kind": "gemm", "tokens": n, "s": s} for n, s in sorted(_gemm_sums(rows).items())]
    out += [dict(r) for r in rows if r["kind"] in ("attn_prefill", "attn_decode")]
    for t in out:
        if not (isinstance(t["s"], (int, float)) and math.isfinite(t["s"]) and t["s"] > 0):
            raise ValueError(f"gpu_fit: row {t} has s={t['s']!r}: expected a positive number of seconds")
        t["calib"] = is_calibration(t)
    return out


def predict(t: dict, m, dev) -> float:
    """The roofline's seconds for one target row on device ``dev`` (a ``config.Device``)."""
    if t["kind"] == "gemm":
        return float(roofline.gemm_time(m, dev, t["tokens"]))
    if t["kind"] == "attn_prefill":
        return roofline.prefill_attention_time(m, dev, np.array([t["tokens"]]), np.array([0.0]))
    return t["batch"] * t["ctx"] * roofline.decode_attention_time_per_token(m, dev, t["format"]) + dev.kernel_latency_s


def _loss(ts: list[dict], m, dev) -> float:
    return float(sum(math.log(predict(t, m, dev) / t["s"]) ** 2 for t in ts))


def calibration_targets(measured: dict) -> list[dict]:
    return [t for t in targets(measured) if t["calib"]]


def fit(measured: dict, hw: str) -> dict[str, float]:
    """The FACTORS (within BOUNDS) minimising the calibration rows' squared log error (Powell)."""
    m, calib = load_model(measured["model"]), calibration_targets(measured)
    kinds = {t["kind"] for t in calib}
    if kinds != {"gemm", "attn_prefill", "attn_decode"}:
        raise ValueError(f"gpu_fit: calibration rows cover {sorted(kinds)}; expected gemm, attn_prefill and "
                         f"attn_decode (prefill N <= {CALIB_PREFILL_MAX}, decode B <= {CALIB_BATCH_MAX}, "
                         f"C <= {CALIB_CTX_MAX})")
    base = load_device(hw)
    lo, hi = (np.array([BOUNDS[f][i] for f in FACTORS]) for i in (0, 1))
    scale = np.array([1.0, 1.0, 1.0, 1.0, 1e-6])  # the latency in us: the same order as the effs

    def loss(x: np.ndarray) -> float:
        vals = np.clip(x * scale, lo, hi)
        return _loss(calib, m, replace(base, **dict(zip(FACTORS, map(float, vals)))))

    best = None
    for lat in LATENCY_STARTS:  # Powell is local and the max() terms make kinks: a few starts
        x0 = np.array([*(getattr(base, f) for f in FACTORS[:4]), lat]) / scale
        r = minimize(loss, x0, method="Powell", bounds=list(zip(lo / scale, hi / scale)),
                     options={"xtol": 1e-4, "ftol": 1e-10, "maxfev": 20000})
        if best is None or r.fun < best.fun:
            best = r
    fitted = {f: float(v) for f, v in zip(FACTORS, np.clip(best.x * scale, lo, hi))}
    return {f: (getattr(base, f) if f in unidentified(calib, m, base, fitted) else v) for f, v in fitted.items()}


def unidentified(calib: list[dict], m, base, fitted: dict[str, float]) -> list[str]:
    """Factors no calibration row depends on (e.g. ``attn_decode_eff`` when every decode row is
    memory-bound): halving one (or adding 5 us of latency) leaves the loss unchanged. They keep
    the prior value rather than the optimiser's arbitrary one."""
    at = _loss(calib, m, replace(base, **fitted))
    out = []
    for f, v in fitted.items():
        moved = v + 5e-6 if f == "kernel_latency_s" else v / 2
        if abs(_loss(calib, m, replace(base, **{**fitted, f: moved})) - at) <= 1e-9 * max(at, 1e-12):
            out.append(f)
    return out


def steps(measured: dict) -> list[dict]:
    """Per-layer steps: prefill N (GEMMs + attention) and decode (B, C, FMT) (GEMMs at B + attention)."""
    ts = targets(measured)
    gemm = {t["tokens"]: t["s"] for t in ts if t["kind"] == "gemm"}
    out = []
    for t in ts:
        if t["kind"] == "gemm":
            continue
        n = t["tokens"] if t["kind"] == "attn_prefill" else t["batch"]
        if n not in gemm:
            raise ValueError(f"gpu_fit: no gemm rows at tokens={n} for the step of {t}; rerun eval.sim.gpu_measure")
        out.append({**{k: v for k, v in t.items() if k != "s"}, "gemm": {"kind": "gemm", "tokens": n, "s": gemm[n]},
                    "attn": t, "s": gemm[n] + t["s"]})
    return out


def evaluate(measured: dict, hw: str, factors: dict[str, float]) -> dict:
    """Predictions of every step with the fitted factors; held-out error keys."""
    m, dev = load_model(measured["model"]), replace(load_device(hw), **factors)
    rows = []
    for st in steps(measured):
        pred = predict(st["gemm"], m, dev) + predict(st["attn"], m, dev)
        shape = {k: st[k] for k in ("kind", "tokens", "batch", "ctx", "format") if k in st}
        rows.append({**shape, "calib": st["calib"], "measured_s": st["s"], "predicted_s": pred,
                     "rel_error": abs(pred - st["s"]) / st["s"]})
    held = [r for r in rows if not r["calib"]]
    if not held:
        raise ValueError("gpu_fit: no held-out steps (prefill N >= 4096 or decode B = 64 / C = 32768); "
                         "run eval.sim.gpu_measure without --quick")
    return {"sim_gpu_step_rel_error": max(r["rel_error"] for r in held),
            "sim_gpu_step_rel_error_calib": max(r["rel_error"] for r in rows if r["calib"]),
            "held_out_steps": len(held), "steps": rows}


def write_data(measured: dict, hw: str, factors: dict, err: float, command: str) -> None:
    """The fitted factors into efficiency.json[hw] and measured power into power.json (provenance stated)."""
    path = DATA_DIR / "efficiency.json"
    table = json.loads(path.read_text())
    entry = table.setdefault(hw, {})
    entry.update(factors)
    src = (f"measured on {measured['device']} {measured['date']} (torch {measured['torch']}, triton "
           f"{measured['triton']}), fitted by `{command}`; held-out step error {err:.3f}")
    entry.setdefault("sources", {}).update({f: src for f in factors})
    path.write_text(json.dumps(table, indent=2) + "\n")
    p = measured.get("power") or {}
    if p.get("idle_w") and p.get("prefill_w") and p.get("decode_w"):
        ppath = DATA_DIR / "power.json"
        pt = json.loads(ppath.read_text())
        pt["devices"][hw] = {"idle_w": round(p["idle_w"], 1), "busy_prefill_w": round(p["prefill_w"], 1),
                             "busy_decode_w": round(p["decode_w"], 1),
                             "kind": f"idle: measured ({measured['device']}, {measured['date']}, nvidia-smi, CUDA "
                                     f"context held); busy readings recorded, energy still uses the datasheet"}
        ppath.write_text(json.dumps(pt, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m eval.sim.gpu_fit", description=__doc__.split("\n\n")[0])
    ap.add_argument("measured", help="eval.sim.gpu_measure output")
    ap.add_argument("--hw", default=None, help="hardware.json entry (default: from the measured GPU's name)")
    ap.add_argument("--write", action="store_true", help="update data/efficiency.json and data/power.json")
    ap.add_argument("--out", default=str(RESULTS / "sim_gpu.json"))
    a = ap.parse_args(argv)
    measured = json.loads(Path(a.measured).read_text())
    hw = a.hw or hw_name(measured["device"])
    factors = fit(measured, hw)
    loose = unidentified(calibration_targets(measured), load_model(measured["model"]), load_device(hw), factors)
    ev = evaluate(measured, hw, factors)
    for r in ev["steps"]:
        shape = " ".join(f"{k}={r[k]}" for k in ("tokens", "batch", "ctx", "format") if k in r)
        print(f"{'cal ' if r['calib'] else 'HELD'} {r['kind']:12s} {shape:40s} measured {r['measured_s'] * 1e6:10.1f} us"
              f"  predicted {r['predicted_s'] * 1e6:10.1f} us  err {r['rel_error']:.3f}")
    print(f"factors {factors} (not identified by the calibration rows, kept as assumed: {loose}); sim_gpu_step_rel_error {ev['sim_gpu_step_rel_error']:.3f} "
          f"over {ev['held_out_steps']} held-out steps")
    command = "python -m eval.sim.gpu_fit " + " ".join(argv if argv is not None else [a.measured])
    out = {"device": measured["device"], "date": measured["date"], "hw": hw, "model": measured["model"],
           "factors": factors, "factors_not_identified": loose, "copy_gbps": measured.get("copy_gbps"), "power": measured.get("power"),
           "command": command, **ev}
    Path(a.out).write_text(json.dumps(out, indent=1))
    if a.write:
        write_data(measured, hw, {f: v for f, v in factors.items() if f not in loose}, ev["sim_gpu_step_rel_error"],
                   command)
        print("updated data/efficiency.json and data/power.json")
    return out


if __name__ == "__main__":
    main()
