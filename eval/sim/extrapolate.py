"""Calibrate on short prompts at one link rate; predict long prompts and another rate (issue 22).

Measurements: ``eval/bench_ttft.py`` files (``ttft_s_<config>_<n>`` medians, ``link_rate`` as tc
writes it, optional ``ttft_range_s_<config>_<n>``), all from this CPU box: ``prefill_only`` (a
single server, no transfer), ``pd_fp8_no_link`` (PD, KV over loopback) and PD clusters on a
``tc``-shaped link (``eval/pd_configs.py``: stock SGLang bf16 and memha whole-request configs
send the KV after the forward; ``*_pipelined`` send per layer while the forward runs).

Fit, on the calibration file's points with ``prompt <= short_max`` only (``validate``'s code):

1. prefill overhead, 1/F_gemm, 1/F_attn from ``prefill_only`` (``validate.fit_prefill``). With
   only two short lengths the three are not separable: F_gemm / F_attn is then taken from
   elsewhere (``attn_ratio``; the default is ``validate``'s fit of the harness runs,
   ``eval/results/cpu_pd_measured.json``, prompts 256-2048, a different session and thread
   count) and said so in the result;
2. PD hand-off seconds and PD prefill slowdown from ``pd_fp8_no_link`` (``validate.fit_pd``:
   the shortest and longest short prompt solved exactly);
3. per shaped-link configuration (``link_groups="config"``, the default: each is its own code
   path and byte count) or per send schedule (``"schedule"``: whole-request vs per-layer
   pipelined, shared by their configs), the link's effective bandwidth as a fraction ``eta`` of
   the tc rate and a fixed per-request latency (seconds), least squares on relative error over
   the group's short points (grid, then golden section in ``eta``; the latency is closed form:
   TTFT is affine in it). The simulator's per-slice overhead is left at 0: with the latency it
   is not separable on whole-request sends, and its slices are not memha's sends (below).

Predicted (every point by a one-request replay through ``cluster.simulate``, as ``validate``):
every config at every longer prompt of the calibration file (``long_prompts``) and every config
at every prompt of the other file (``other_rate``: its own tc rate, the same fitted constants).

What the model cannot represent (so it shows up as error, nothing is refitted for it):

* the simulator's per-layer schedule has layers x chunks equal slices and a link that runs
  beside the compute; memha sends per page per layer (thousands of sends at 4K) on a 2-core box
  where Mooncake's TCP transport takes a core while the prefill holds the other, and the
  per-page sends grow slower than linearly in bytes at long prompts (transfer_ms of bf16
  pipelined 8000 tokens 1.53x stock's in the 52mbit run). One (eta, latency) per schedule is
  all the model has;
* with ``link_groups="schedule"`` stock SGLang and memha whole-request sends share one (eta,
  latency): code-path differences are not modelled; the decode side's commit of the first
  token is in the hand-off constant;
* the PD slowdown is measured on loopback and applied on the shaped link as well;
* tc's token bucket and TCP's slow start are in eta and the latency, assumed rate-independent.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval.pd_configs import MAX_TOKENS, PD_CONFIGS, server_args

from . import kernel_rates, validate
from .config import Device, ModelConfig, load_model
from .transfer import Link

PREFILL_ONLY = "prefill_only"
NO_LINK = "pd_fp8_no_link"  # eval/bench_ttft.py's NO_LINK: PD with the KV over loopback
SHORT_MAX = 1024
ETA_RANGE = (0.05, 4.0)
_TC_UNITS = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8.0, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}


def parse_tc_rate(rate: str) -> float:
    """Gbit/s of a tc rate string (``52mbit``; tc's ``mbps`` is megabytes per second)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]+)\s*", str(rate))
    if not m or m.group(2).lower() not in _TC_UNITS:
        raise ValueError(f"link rate {rate!r}: expected a number and one of {sorted(_TC_UNITS)}")
    return float(m.group(1)) * _TC_UNITS[m.group(2).lower()] / 1e9


def config_kind(name: str) -> tuple[str, str, bool]:
    """(setup a|b|c, KV format, pipelined) of a bench_ttft configuration, from ``PD_CONFIGS``."""
    if name == PREFILL_ONLY:
        return "a", "bf16", False
    if name not in PD_CONFIGS:
        raise ValueError(f"config {name!r}: not in eval/pd_configs.PD_CONFIGS")
    env = PD_CONFIGS[name].env
    return ("b" if name == NO_LINK else "c"), env.get("MEMHA_KV_FORMAT", "bf16"), env.get("MEMHA_PIPELINE") == "1"


def load_ttft(path: str | Path) -> dict:
    """{"path", "link_rate", "gbps", "date", "points": {config: {n: median s}}, "ranges": {...}}."""
    path = Path(path)
    d = json.loads(path.read_text())
    if "link_rate" not in d:
        raise ValueError(f"{path}: no link_rate (not an eval/bench_ttft.py output?)")
    pts: dict[str, dict[int, float]] = {}
    rng: dict[str, dict[int, list[float]]] = {}
    for k, v in d.items():
        for prefix, dest in (("ttft_s_", pts), ("ttft_range_s_", rng)):
            if k.startswith(prefix):
                name, n = k[len(prefix):].rsplit("_", 1)
                dest.setdefault(name, {})[int(n)] = v
    if PREFILL_ONLY not in pts:
        raise ValueError(f"{path}: no ttft_s_{PREFILL_ONLY}_<n> keys")
    date = d.get("date") or dt.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")
    return {"path": str(path), "link_rate": d["link_rate"], "gbps": parse_tc_rate(d["link_rate"]), "date": date,
            "reps": d.get("reps"), "points": pts, "ranges": rng}


def testbed(max_prompt: int) -> dict:
    """The validate-style testbed table of a bench_ttft run: pool ``MAX_TOKENS``, chunk as its servers."""
    tb = validate.testbed_table()
    chunk = int(server_args(max_prompt)[server_args(max_prompt).index("--chunked-prefill-size") + 1])
    return {**tb, "device": dict(tb["device"], chunked_prefill_size=chunk), "pool_tokens": MAX_TOKENS}


@dataclass(frozen=True)
class Fit:
    model: ModelConfig
    device: Device
    handoff_s: float
    slowdown: float | None
    links: dict[str, tuple[float, float]]  # link group (config or schedule) -> (eta, latency_s)
    attn_ratio: float | None  # F_gemm / F_attn when given, else None (fitted)
    attn_ratio_source: str
    link_groups: str = "config"  # what ``links`` is keyed by: "config" or "schedule"
    kernel: kernel_rates.KernelPrefill | None = None  # the prefill priced by kernel rates at each length

    def dev(self):
        """What the replays price a prompt with: the fitted device, or the kernel-rate one per length."""
        return self.kernel.device if self.kernel is not None else self.device

    def predict(self, tb: dict, config: str, prompt: int, gbps: float) -> float:
        setup, fmt, pipe = config_kind(config)
        kw: dict = {"kv_fmt": fmt, "pipelined": pipe}
        if setup == "c":
            eta, lat = self.links[link_group(config, self.link_groups)]
            kw["link"] = Link(gbps=eta * gbps, latency_s=lat)
        return validate.replay_ttft(self.model, self.dev(), setup, prompt, self.handoff_s, tb, self.slowdown, **kw)

    def as_dict(self) -> dict:
        d = self.device
        prefill = (self.kernel.as_dict() if self.kernel is not None else
                   {"prefill_model": "fitted rates", "gemm_gflops": d.bf16_tflops * 1e3,
                    "attn_prefill_gflops": d.attn_prefill_flops / 1e9, "prefill_overhead_s": d.prefill_step_overhead_s,
                    "attn_ratio_given": self.attn_ratio, "attn_ratio_source": self.attn_ratio_source})
        return {**prefill, "pd_handoff_s": self.handoff_s, "pd_prefill_slowdown": self.slowdown,
                **{f"link_{s}_eta": e for s, (e, _) in self.links.items()},
                **{f"link_{s}_latency_s": lat for s, (_, lat) in self.links.items()}}


def _rows(f: dict, configs, short_max: int) -> list[dict]:
    return [{"config": c, "prompt": n, "ttft_s": t} for c in configs if c in f["points"]
            for n, t in sorted(f["points"][c].items()) if n <= short_max]


def harness_attn_ratio() -> float:
    """F_gemm / F_attn of validate's fit of the harness runs (eval/results/cpu_pd_measured.json)."""
    if not validate.HARNESS_FILE.exists():
        raise ValueError(f"{validate.HARNESS_FILE} is missing: pass attn_ratio (--attn-ratio) for a 2-length fit")
    dev = validate.fit_testbed(validate.load_table("harness"))[1]
    return dev.bf16_tflops / (dev.attn_prefill_flops / 1e12)


def _fit_link(m: ModelConfig, dev, handoff: float, slowdown: float | None, tb: dict, rows: list[dict],
              gbps: float) -> tuple[float, float]:
    """(eta, latency_s) minimising the relative squared error of the replayed ``rows``."""
    y = np.array([r["ttft_s"] for r in rows])
    w = 1.0 / y ** 2

    def cost(eta: float) -> tuple[float, float]:
        base = np.array([validate.replay_ttft(m, dev, "c", r["prompt"], handoff, tb, slowdown,
                                              kv_fmt=config_kind(r["config"])[1], pipelined=config_kind(r["config"])[2],
                                              link=Link(gbps=eta * gbps)) for r in rows])
        lat = max(0.0, float(np.sum(w * (y - base)) / np.sum(w)))
        return float(np.sum(w * (y - base - lat) ** 2)), lat

    grid = np.geomspace(*ETA_RANGE, 121)
    costs = [cost(e)[0] for e in grid]
    i = int(np.argmin(costs))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(60):  # golden section between the best grid point's neighbours
        c, d = b - g * (b - a), a + g * (b - a)
        a, b = (a, d) if cost(c)[0] < cost(d)[0] else (c, b)
    eta = 0.5 * (a + b)
    return eta, cost(eta)[1]


def link_group(config: str, link_groups: str) -> str:
    """The name of the (eta, latency) pair a shaped-link config uses: itself, or its send schedule."""
    if link_groups not in ("config", "schedule"):
        raise ValueError(f"link_groups={link_groups!r}: expected 'config' or 'schedule'")
    return config if link_groups == "config" else ("pipelined" if config_kind(config)[2] else "whole")


def fit(calib: dict, short_max: int = SHORT_MAX, attn_ratio: float | None = None, tb: dict | None = None,
        link_groups: str = "config", kernel_table: dict | None = None, kernel_form: str = "additive") -> Fit:
    """Fit every constant on ``calib``'s points with prompt <= ``short_max``. With ``kernel_table``
    (``kernel_rates.measure``) the prefill is priced by kernel rates measured at each length and
    only its overhead and, by ``kernel_form``, a per-token cost or a factor on kernel time are
    fitted (``kernel_rates.fit``; ``attn_ratio`` is then unused)."""
    tb = tb or testbed(max(n for c in calib["points"].values() for n in c))
    m = load_model(tb["model"])
    pre = _rows(calib, [PREFILL_ONLY], short_max)
    if kernel_table is not None:
        kp = kernel_rates.fit(m, validate._base_device(tb), kernel_table, pre, kernel_form, tb)
        handoff, slowdown = validate.fit_pd(m, kp.device, _rows(calib, [NO_LINK], short_max), tb,
                                            kv_fmt=config_kind(NO_LINK)[1])
        links = _fit_links(m, kp.device, handoff, slowdown, tb, calib, short_max, link_groups)
        return Fit(m, kp.base, handoff, slowdown, links, None, "kernel rates", link_groups, kp)
    if attn_ratio is not None:
        source = "given"
    elif len(pre) >= 3:
        source = "fitted (3 unknowns)"
    else:
        attn_ratio, source = harness_attn_ratio(), "validate's harness fit (eval/results/cpu_pd_measured.json)"
    dev = validate.fit_prefill(m, validate._base_device(tb), pre, tb, attn_ratio)
    handoff, slowdown = validate.fit_pd(m, dev, _rows(calib, [NO_LINK], short_max), tb, kv_fmt=config_kind(NO_LINK)[1])
    links = _fit_links(m, dev, handoff, slowdown, tb, calib, short_max, link_groups)
    return Fit(m, dev, handoff, slowdown, links, attn_ratio, source, link_groups)


def _fit_links(m: ModelConfig, dev, handoff: float, slowdown: float | None, tb: dict, calib: dict,
               short_max: int, link_groups: str) -> dict[str, tuple[float, float]]:
    """(eta, latency_s) of each link group that has short shaped-link points in ``calib``."""
    links = {}
    shaped = [c for c in calib["points"] if config_kind(c)[0] == "c"]
    for g in sorted({link_group(c, link_groups) for c in shaped}):
        rows = _rows(calib, [c for c in shaped if link_group(c, link_groups) == g], short_max)
        if rows:
            links[g] = _fit_link(m, dev, handoff, slowdown, tb, rows, calib["gbps"])
    return links


def run(calib_path: str | Path, other_path: str | Path | None = None, short_max: int = SHORT_MAX,
        attn_ratio: float | None = None, link_groups: str = "config", kernel_rates_path: str | Path | None = None,
        kernel_form: str = "additive") -> dict:
    """Fit on the calibration file's short points, predict the rest; rows and the sim_extrapolation_* keys."""
    calib = load_ttft(calib_path)
    files = [("calib", calib)] + ([("other", load_ttft(other_path))] if other_path else [])
    tb = testbed(max(n for _, f in files for c in f["points"].values() for n in c))
    table = kernel_rates.load(kernel_rates_path, load_model(tb["model"])) if kernel_rates_path else None
    ft = fit(calib, short_max, attn_ratio, tb, link_groups, table, kernel_form)
    rows = []
    for which, f in files:
        for c in sorted(f["points"]):
            if config_kind(c)[0] == "c" and link_group(c, link_groups) not in ft.links:
                continue  # no calibration point for this config's link group
            for n, y in sorted(f["points"][c].items()):
                role = ("other_rate" if which == "other" else "calibration" if n <= short_max else "long_prompts")
                pred = ft.predict(tb, c, n, f["gbps"])
                rng = f["ranges"].get(c, {}).get(n)
                rows.append({"file": f["path"], "link_rate": f["link_rate"], "config": c, "prompt": n, "role": role,
                             "measured_s": y, "predicted_s": pred, "rel_error": abs(pred - y) / y,
                             "measured_range_s": rng,
                             "within_range": None if rng is None else bool(rng[0] <= pred <= rng[1])})
    held = [r for r in rows if r["role"] != "calibration"]
    if not held:
        raise ValueError(f"nothing to predict: every point has prompt <= {short_max} and no other file")
    out = {"sim_extrapolation_max_rel_error": max(r["rel_error"] for r in held),
           "sim_extrapolation_calibration_max_rel_error": max(r["rel_error"] for r in rows if r["role"] == "calibration"),
           "sim_extrapolation_points": len(held),
           "sim_extrapolation_within_20pct": sum(r["rel_error"] <= 0.20 for r in held)}
    for g in ("long_prompts", "other_rate"):
        grp = [r["rel_error"] for r in held if r["role"] == g]
        if grp:
            out[f"sim_extrapolation_max_rel_error_{g}"] = max(grp)
    out["sim_extrapolation_max_rel_error_by_config"] = {
        c: max(r["rel_error"] for r in held if r["config"] == c) for c in sorted({r["config"] for r in held})}
    out["sim_extrapolation_fit"] = ft.as_dict()
    out["sim_extrapolation_short_max"] = short_max
    out["sim_extrapolation_link_groups"] = link_groups
    out["sim_extrapolation_prefill_model"] = f"kernel_rates ({kernel_form})" if table else "fitted rates"
    out["sim_extrapolation_inputs"] = {w: {"path": f["path"], "date": f["date"], "link_rate": f["link_rate"],
                                           "reps": f["reps"]} for w, f in files}
    out["sim_extrapolation_rows"] = rows
    return out


def format_table(v: dict) -> str:
    lines = [f"{'config':22} {'rate':>8} {'prompt':>6} {'measured':>9} {'predicted':>9} {'err':>6}  role"]
    for r in v["sim_extrapolation_rows"]:
        lines.append(f"{r['config']:22} {r['link_rate']:>8} {r['prompt']:6d} {r['measured_s']:9.3f} "
                     f"{r['predicted_s']:9.3f} {100 * r['rel_error']:5.1f}%  {r['role']}")
    lines.append(json.dumps({k: v[k] for k in v if k.startswith("sim_extrapolation_max")}, indent=1))
    lines.append(json.dumps(v["sim_extrapolation_fit"], indent=1))
    return "\n".join(lines)


def write_keys(v: dict, sim_json: Path, command: str) -> None:
    """Replace ``sim_json``'s sim_extrapolation_* keys by ``v``'s and the command that made them;
    every other key is kept."""
    out = json.loads(sim_json.read_text()) if sim_json.exists() else {}
    out = {k: x for k, x in out.items() if not k.startswith("sim_extrapolation_")}  # no stale keys
    out.update({k: x for k, x in v.items() if k.startswith("sim_extrapolation_")})
    out["sim_extrapolation_command"] = command
    sim_json.parent.mkdir(parents=True, exist_ok=True)
    sim_json.write_text(json.dumps(out, indent=1))
