"""Results of a goodput run: the flat JSON, the markdown summary, the plots.

Flat keys (``eval/results/goodput.json``), per trace T and configuration C:
``goodput_T_C`` (req/s), ``goodput_status_T_C`` (bracketed / lower_bound / none),
``goodput_multiplier_T_C`` (x the trace window's native rate), ``goodput_per_dollar_{on_demand,spot}_T_C``
(good requests per USD), ``ttft_p50_s_T_C`` ... ``tpot_p99_s_T_C`` (the run at the goodput rate),
``slo_ttft_s_T``, ``slo_tpot_s_T``, ``goodput_ratio_T`` (memha_fp8_pipelined / stock_bf16) and
``goodput_ratio`` (the lowest over the traces). ``runs`` lists every run; ``cdf`` keeps the
per-request TTFT/TPOT of each goodput run so the plots can be redrawn from the JSON.
"""
from __future__ import annotations

import json

from eval.goodput.metrics import SLO, goodput
from eval.goodput.prices import per_dollar
from eval.goodput.runner import RunPoint

BASE, MEMHA = "stock_bf16", "memha_fp8_pipelined"


def goodput_run(points: list[RunPoint], g: float) -> RunPoint | None:
    """The passing run at the goodput rate (None when nothing passed)."""
    hits = [p for p in points if p.passed and abs(p.rate - g) < 1e-9]
    return hits[0] if hits else None


def flatten(trace: str, config: str, points: list[RunPoint], slo: SLO, usd_per_hour: dict[str, float],
            target: float) -> tuple[dict, dict | None]:
    """(flat keys of one trace x config, the CDF record of its goodput run)."""
    g, status = goodput([(p.rate, p.attainment) for p in points], target)
    key = f"{trace}_{config}"
    out = {f"goodput_{key}": round(g, 4), f"goodput_status_{key}": status,
           f"min_rate_tested_{key}": round(min(p.rate for p in points), 4),
           f"max_rate_tested_{key}": round(max(p.rate for p in points), 4)}
    run = goodput_run(points, g)
    if run is not None:
        out[f"goodput_multiplier_{key}"] = round(run.multiplier, 4)
        s = run.summary(slo)
        for metric in ("ttft_s", "tpot_s"):
            for q, v in s[metric].items():
                out[f"{metric.split('_')[0]}_{q}_s_{key}"] = v
    for col, usd in usd_per_hour.items():
        out[f"goodput_per_dollar_{col}_{key}"] = round(per_dollar(g, usd), 1)
    cdf = None if run is None else {"rate": round(run.rate, 4),
                                    "ttft": [round(r.ttft, 4) for r in run.results if r.ok],
                                    "tpot": [round(r.tpot, 5) for r in run.results if r.ok]}
    return out, cdf


def ratio(out: dict, trace: str, memha: str = MEMHA) -> tuple[float | None, str]:
    """``memha`` (memha_fp8_pipelined) / stock_bf16 goodput on ``trace`` and what kind of bound it is."""
    a, b = out.get(f"goodput_{trace}_{memha}"), out.get(f"goodput_{trace}_{BASE}")
    if a is None or b is None:
        return None, "missing"
    sa, sb = out[f"goodput_status_{trace}_{memha}"], out[f"goodput_status_{trace}_{BASE}"]
    if b == 0:
        return None, "undefined (stock goodput 0 at the tested rates)"
    kind = "lower bound" if sa == "lower_bound" and sb != "lower_bound" else (
        "upper bound" if sb == "lower_bound" and sa != "lower_bound" else "measured")
    if sa == "lower_bound" and sb == "lower_bound":
        return None, "unknown (both passed at the top of the tested range)"
    return round(a / b, 4), kind


# The settings that define an experiment: runs merged or compared as repeats must agree on them.
EXPERIMENT_SETTINGS = ("model", "link_rate", "n_requests", "length_scale", "k_ttft", "k_tpot",
                       "target_attainment", "prefill_threads", "decode_threads", "max_input", "max_output",
                       "compute_dtype")
SETTING_DEFAULTS = {"compute_dtype": "model"}  # what files written before the key existed ran with


def differing_setting(a: dict, b: dict) -> str | None:
    """The first of EXPERIMENT_SETTINGS on which results a and b differ, else None."""
    return next((k for k in EXPERIMENT_SETTINGS
                 if a.get(k, SETTING_DEFAULTS.get(k)) != b.get(k, SETTING_DEFAULTS.get(k))), None)


def merge(parts: list[dict]) -> dict:
    """One results dict from runs of *different* traces (each part: one ``python -m
    eval.goodput`` output). Per-trace keys are unions; settings must agree (they define the
    experiment), else ValueError naming the key."""
    out = json.loads(json.dumps(parts[0]))
    for part in parts[1:]:
        key = differing_setting(out, part)
        if key:
            raise ValueError(f"cannot merge: {key} differs ({out.get(key)!r} vs {part.get(key)!r})")
        dup = set(part["traces"]) & set(out["traces"])
        if dup:
            raise ValueError(f"cannot merge: trace(s) {sorted(dup)} in more than one file")
        for key, value in part.items():
            if key == "traces":
                out["traces"] += value
            elif key == "configs":
                out["configs"] += [c for c in value if c not in out["configs"]]
            elif key == "runs":
                out["runs"] += value
            elif key == "cdf":
                out["cdf"].update(value)
            elif key in ("command", "date"):
                out[key] = f"{out[key]} ; {value}"
            elif key in ("wall_s", "estimated_wall_s"):
                out[key] = out.get(key, 0) + value
            elif key not in out:
                out[key] = value
    return out


def repeats(parts: list[dict], names: list[str]) -> dict:
    """The headline over repeated runs of the *same* experiment (same settings; a run may cover
    fewer traces): per run and trace its ``goodput_ratio``, and ``goodput_ratio`` = the lowest
    over every run and trace. Lowest, not mean: one 20-request run per rate is a single sample
    at the knee, and the claim should hold in each run. ValueError names a setting that differs
    or a run with no defined ratio."""
    out = {"what": "memha fp8 pipelined / stock SGLang PD bf16 goodput; goodput_ratio = the lowest "
                   "over the runs and traces below", "runs_from": names}
    lowest = []
    for name, part in zip(names, parts):
        key = differing_setting(parts[0], part)
        if key:
            raise ValueError(f"not repeats of one experiment: {key} differs in {name} "
                             f"({parts[0].get(key)!r} vs {part.get(key)!r})")
        summarize(part)
        if part["goodput_ratio"] is None:
            raise ValueError(f"{name}: no defined goodput ratio ({part['goodput_ratio_kind']})")
        out[f"date_{name}"] = part["date"]
        for t in part["traces"]:
            out[f"goodput_ratio_{name}_{t}"] = part[f"goodput_ratio_{t}"]
        out[f"goodput_ratio_{name}"] = part["goodput_ratio"]
        lowest.append(part["goodput_ratio"])
    out["goodput_ratio"] = min(lowest)
    return out


def summarize(out: dict) -> None:
    """Set ``goodput_ratio_T`` per trace and ``goodput_ratio`` (the lowest defined one) in ``out``."""
    ratios = []
    for t in out["traces"]:
        r, kind = ratio(out, t)
        out[f"goodput_ratio_{t}"], out[f"goodput_ratio_kind_{t}"] = r, kind
        if r is not None:
            ratios.append((r, kind))
    out["goodput_ratio"], out["goodput_ratio_kind"] = min(ratios) if ratios else (None, "undefined")
    out["goodput_ratio_traces_at_1_5x"] = sum(r >= 1.5 for r, _ in ratios)


def markdown_table(out: dict) -> str:
    """Per trace: SLOs, then one row per configuration."""
    lines = []
    for trace in out["traces"]:
        lines.append(f"**{trace}** (window of {out['n_requests']} requests from #{out[f'window_offset_{trace}']}, "
                     f"native {out[f'native_rate_{trace}']:.3f} req/s; SLO TTFT <= {out[f'slo_ttft_s_{trace}']:.2f} s, "
                     f"TPOT <= {out[f'slo_tpot_s_{trace}'] * 1e3:.0f} ms)")
        lines.append("")
        lines.append("| config | goodput (req/s) | x trace rate | good req / $ (on-demand / spot) "
                     "| TTFT p50 / p90 (s) | TPOT p50 / p90 (ms) | vs stock |")
        lines.append("|---|---|---|---|---|---|---|")
        base = out.get(f"goodput_{trace}_{BASE}")
        for c in out["configs"]:
            k = f"{trace}_{c}"
            if f"goodput_{k}" not in out:
                continue
            g, st = out[f"goodput_{k}"], out[f"goodput_status_{k}"]
            mark = {"lower_bound": ">= ", "none": "< "}.get(st, "")
            gtxt = f"{mark}{g:.3f}" if st != "none" else f"0 (< {out.get(f'min_rate_tested_{k}', 0):.3f})"
            mult = out.get(f"goodput_multiplier_{k}")
            ttft = _pair(out, "ttft", k, 1)
            tpot = _pair(out, "tpot", k, 1e3)
            rel = f"{g / base:.2f}x" if base else "-"
            if c == MEMHA and f"goodput_ratio_kind_{trace}" in out:
                r = out.get(f"goodput_ratio_{trace}")
                rel = f"**{'-' if r is None else f'{r:.2f}x'}** ({out[f'goodput_ratio_kind_{trace}']})"
            lines.append(f"| {c} | {gtxt} | {'-' if mult is None else f'{mult:.3f}'} | "
                         f"{out[f'goodput_per_dollar_on_demand_{k}']:.0f} / {out[f'goodput_per_dollar_spot_{k}']:.0f} "
                         f"| {ttft} | {tpot} | {rel} |")
        lines.append("")
    lines.append(f"`goodput_ratio` (memha fp8 pipelined / stock bf16, lowest over traces) = "
                 f"**{out.get('goodput_ratio')}** ({out.get('goodput_ratio_kind')})")
    return "\n".join(lines)


def _pair(out: dict, metric: str, key: str, scale: float) -> str:
    a, b = out.get(f"{metric}_p50_s_{key}"), out.get(f"{metric}_p90_s_{key}")
    if a is None or b is None:
        return "-"
    fmt = "{:.2f}" if scale == 1 else "{:.0f}"
    return f"{fmt.format(a * scale)} / {fmt.format(b * scale)}"


def plot(out: dict, png_rate: str, png_cdf: str) -> list[str]:
    """Attainment vs rate (goodput marked) and TTFT/TPOT CDFs at each configuration's goodput."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.* below)

    traces, configs = out["traces"], out["configs"]
    colors = {c: f"C{i}" for i, c in enumerate(configs)}
    fig, axes = plt.subplots(1, len(traces), figsize=(6.0 * len(traces), 4.2), squeeze=False)
    for ax, trace in zip(axes[0], traces):
        for c in configs:
            pts = sorted((r["rate"], r["attainment"]) for r in out["runs"] if r["trace"] == trace and r["config"] == c)
            if not pts:
                continue
            ax.plot(*zip(*pts), marker="o", color=colors[c], label=c)
            g = out.get(f"goodput_{trace}_{c}", 0)
            if g:
                ax.axvline(g, color=colors[c], linestyle=":", alpha=0.6)
        ax.axhline(out["target_attainment"], color="k", linestyle="--", linewidth=1, label="target")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(-0.02, 1.02)
        slo_ttft, slo_tpot = out[f"slo_ttft_s_{trace}"], out[f"slo_tpot_s_{trace}"]
        ax.set_title(f"{trace}: TTFT<={slo_ttft:.1f}s, TPOT<={slo_tpot * 1e3:.0f}ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M PD on CPU, P->D link {out['link_rate']} (dotted: goodput)")
    fig.tight_layout()
    fig.savefig(png_rate, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(len(traces), 2, figsize=(11, 3.6 * len(traces)), squeeze=False)
    for row, trace in zip(axes, traces):
        for ax, metric, scale, slo_key, unit in ((row[0], "ttft", 1, "slo_ttft_s", "s"),
                                                 (row[1], "tpot", 1e3, "slo_tpot_s", "ms")):
            for c in configs:
                rec = out["cdf"].get(trace, {}).get(c)
                if not rec or not rec[metric]:
                    continue
                v = sorted(x * scale for x in rec[metric])
                ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", color=colors[c],
                        label=f"{c} @ {rec['rate']:.3f} req/s")
            ax.axvline(out[f"{slo_key}_{trace}"] * scale, color="k", linestyle="--", linewidth=1, label="SLO")
            ax.set_xlabel(f"{metric.upper()} ({unit})")
            ax.set_ylabel("fraction of requests")
            ax.set_title(f"{trace}: {metric.upper()} CDF at each config's goodput rate")
            ax.grid(True, alpha=0.3)
        row[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_cdf, dpi=120)
    plt.close(fig)
    return [png_rate, png_cdf]
