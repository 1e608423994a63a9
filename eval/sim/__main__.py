"""Command line: ``python -m eval.sim <command>`` from the repository root.

    vendor-traces                 rebuild eval/traces/*.csv.gz from shared/traces
    validate [--source S] [--write] [--harness-file F] [--repeat]
                                  fit on the CPU testbed, print predicted vs measured;
                                  S = auto (harness runs when eval/results/cpu_pd_measured.json
                                  exists) | harness | reference (older copied medians);
                                  --write updates the validation keys of eval/results/sim.json
                                  (with --repeat its sim_repeat_* keys: a repeat session's file F)
    extrapolate --calib F [--other F2] [--short-max N] [--attn-ratio R] [--link-groups G]
                [--kernel-rates K [--kernel-form additive|scaled]] [--write]
                                  fit on bench_ttft file F's prompts <= N (1024), predict its longer
                                  prompts and every point of F2 (another link rate); with K the
                                  prefill is priced by kernel rates measured at each length; --write
                                  merges the sim_extrapolation_* keys into eval/results/sim.json
    kernel-rates [--model M] [--lengths a,b] [--dtype D] [--threads T] [--out F]
                                  time one layer's GEMMs and causal attention at each length on this
                                  machine (torch, as the servers compute) -> eval/results/kernel_rates.json
    replay MODEL SYSTEM P D TRACE [--rate R] [--n N]     one replay, prints TTFT/TPOT percentiles
    search MODEL TRACE BUDGET [--systems a,b] [--price spot] [--n N]   P:D search, prints a table
    all [--n N] [--budget B]      everything for the report: eval/results/sim.json + sim_*.png
    energy [--n N] [--budget B] [--traces a,b]   the paper pairing (L40S prefill + H100 decode vs
                                  homogeneous H100) at each one's goodput: goodput, goodput per
                                  $/h, J/request, J/output token -> eval/results/sim_energy.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import energy as E
from . import extrapolate as X
from . import search as S
from . import systems, trace, validate
from .cluster import simulate

RESULTS = Path(__file__).resolve().parents[2] / "eval" / "results"
MAIN_TRACES = ("azure_conv", "azure_code", "mooncake_conversation")
MAX_OUTPUT = 4096
KEPT_BY_ALL = ("sim_repeat_", "sim_extrapolation_")  # sim.json keys of `validate --repeat`, `extrapolate`


def _trace(name: str, n: int) -> trace.Trace:
    ctx = systems.systems_table()["max_context"]
    return trace.load(name).head(n).clip(ctx, MAX_OUTPUT)


def _pct(x: np.ndarray) -> str:
    x = x[np.isfinite(x)]
    return " ".join(f"p{q}={np.percentile(x, q):.3f}" for q in (50, 90, 99)) if len(x) else "n/a"


def _print_validation(v: dict) -> None:
    print(f"source: {v['source']}")
    print(f"{'metric':6} {'setup':5} {'prompt':>6} {'batch':>5} {'measured':>9} {'predicted':>9} {'err':>6}  role")
    for r in v["rows"]:
        print(f"{r['metric']:6} {r['setup']:5} {r['prompt']:6d} {r['batch']:5d} {r['measured_s']:9.4f} "
              f"{r['predicted_s']:9.4f} {100 * r['rel_error']:5.1f}%  {r['role']}")
    print({k: v[k] for k in v if k.startswith("sim_")})
    print({k: v["fit"][k] for k in v["fit"]})


def _validation_keys(v: dict) -> dict:
    """The sim.json keys of one validation; the reference validation is kept beside a harness one."""
    out = {k: v[k] for k in v if k.startswith("sim_")}
    out["sim_validation_rows"] = v["rows"]
    out["sim_fit"] = v["fit"]
    if v["source"] == "harness":
        ref = validate.run("reference")
        out.update({f"sim_reference_{k[4:]}": ref[k] for k in ref if k.startswith("sim_")})
        out["sim_reference_validation_rows"] = ref["rows"]
    return out


def _plot_validation(v: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = v["rows"]
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = np.arange(len(rows))
    what = "harness runs, eval/measure_cpu_pd.py" if v["source"] == "harness" else "reference runs"
    ax.bar(xs - 0.2, [r["measured_s"] for r in rows], 0.4, label=f"measured ({what})")
    ax.bar(xs + 0.2, [r["predicted_s"] for r in rows], 0.4, label="simulator")
    ax.set_yscale("log")
    ax.set_xticks(xs, [f"{r['metric']} {r['setup']}\n{r['prompt']}x{r['batch']}\n{r['role'][:3]}" for r in rows],
                  fontsize=7)
    ax.set_ylabel("seconds (median)")
    ax.set_title("CPU testbed, SmolLM2-135M: simulator vs measured (cal = fitted, val = predicted)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "sim_validation.png", dpi=110)
    plt.close(fig)


def _repeat_keys(v: dict, harness_file: str) -> dict:
    """The sim_repeat_* keys: a repeat session's validation, beside the official one."""
    out = {f"sim_repeat_{k[4:]}": v[k] for k in v if k.startswith("sim_")}
    out.update(sim_repeat_fit=v["fit"], sim_repeat_validation_rows=v["rows"], sim_repeat_file=harness_file)
    return out


def cmd_validate(a: argparse.Namespace) -> dict:
    repeat = getattr(a, "repeat", False)
    if repeat and not (a.write and a.harness_file):
        raise SystemExit("validate --repeat needs --write and --harness-file (the repeat session's measure_cpu_pd.py output)")
    v = validate.run(a.source, getattr(a, "harness_file", None))
    _print_validation(v)
    if getattr(a, "write", False):
        path = RESULTS / "sim.json"
        out = json.loads(path.read_text()) if path.exists() else {}
        if repeat:
            out.update(_repeat_keys(v, a.harness_file))
            path.write_text(json.dumps(out, indent=1))
            print(f"updated the sim_repeat_* keys of {path}")
            return v
        out.update(_validation_keys(v))
        path.write_text(json.dumps(out, indent=1))
        _plot_validation(v)
        print(f"updated the validation keys of {path} and {RESULTS / 'sim_validation.png'}")
    return v


def kept_keys(path: Path) -> dict:
    """The keys of ``path`` that `all` keeps: those other commands write (``KEPT_BY_ALL``)."""
    old = json.loads(path.read_text()) if path.exists() else {}
    return {k: v for k, v in old.items() if k.startswith(KEPT_BY_ALL)}


def cmd_kernel_rates(a: argparse.Namespace) -> dict:
    from . import kernel_rates
    from .config import load_model

    t = kernel_rates.measure(load_model(a.model), [int(x) for x in a.lengths.split(",")], a.dtype, a.threads, a.reps)
    for r in t["rows"]:
        print(f"n={r['n']:6d}  gemm {r['gemm_gflops']:7.1f} GFLOP/s ({r['gemm_s'] * 1e3:8.2f} ms/layer)  "
              f"attn {r['attn_gflops']:7.1f} GFLOP/s ({r['attn_s'] * 1e3:8.2f} ms/layer)")
    Path(a.out).write_text(json.dumps(t, indent=1))
    print(f"wrote {a.out}")
    return t


def cmd_extrapolate(a: argparse.Namespace, argv: list[str]) -> dict:
    v = X.run(a.calib, a.other, a.short_max, a.attn_ratio, a.link_groups, a.kernel_rates, a.kernel_form)
    print(X.format_table(v))
    if a.write:
        path = RESULTS / "sim.json"
        X.write_keys(v, path, "python -m eval.sim " + " ".join(argv))
        print(f"updated the sim_extrapolation_* keys of {path}")
    return v


def cmd_replay(a: argparse.Namespace) -> None:
    tr = _trace(a.trace, a.n)
    if a.rate:
        tr = tr.at_rate(a.rate)
    spec = systems.build_cluster(a.model, a.system, a.p, a.d)
    t0 = time.perf_counter()
    r = S.replay(spec, tr)
    dt = time.perf_counter() - t0
    lo, hi = systems.slo(a.trace)
    print(f"{len(tr)} requests at {tr.rate:.2f} req/s replayed in {dt:.2f} s; cost ${spec.cost_per_hour:.2f}/h")
    print(f"TTFT {_pct(r.ttft)}\nTPOT {_pct(r.tpot)}\nfailed {int(r.failed.sum())}; "
          f"SLO attainment {S.attainment(r, lo, hi):.3f} (TTFT<={lo}s, TPOT<={hi}s)")


def cmd_search(a: argparse.Namespace) -> list[S.Point]:
    tr = _trace(a.trace, a.n)
    names = a.systems.split(",") if a.systems else systems.system_names()
    pts = []
    print(f"{'system':22} {'P':>3} {'D':>3} {'$/h':>7} {'goodput r/s':>11} {'req/$':>8}")
    for s in names:
        for p in S.search(a.model, tr, s, a.budget, a.price):
            pts.append(p)
            print(f"{s:22} {p.n_prefill:3d} {p.n_decode:3d} {p.cost_per_hour:7.2f} {p.goodput_rps:11.2f} "
                  f"{p.goodput_per_dollar:8.0f}")
    return pts


def _speed(n: int = 10000) -> float:
    tr = _trace("azure_conv", n)
    spec = systems.build_cluster("qwen3-8b", "hma-serve", 4, 4)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        simulate(spec, tr.arrival, tr.input_len, tr.output_len)
        best = min(best, time.perf_counter() - t0)
    return best


def cmd_all(a: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    RESULTS.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    v = cmd_validate(a)
    out.update(_validation_keys(v))
    out["sim_seconds_10k"] = _speed()
    print(f"10k-request replay: {out['sim_seconds_10k']:.2f} s")
    _plot_validation(v)

    # goodput search
    names = systems.system_names()
    search_out: dict = {}
    for tname in MAIN_TRACES:
        tr = _trace(tname, a.n)
        search_out[tname] = {}
        for s in names:
            t0 = time.perf_counter()
            pts = S.search(a.model, tr, s, a.budget, a.price)
            best = max(pts, key=lambda p: p.goodput_rps)
            best_d = max(pts, key=lambda p: p.goodput_per_dollar)
            search_out[tname][s] = {
                "points": [[p.n_prefill, p.n_decode, p.cost_per_hour, p.goodput_rps] for p in pts],
                "best": [best.n_prefill, best.n_decode, best.cost_per_hour, best.goodput_rps],
                "best_goodput_per_dollar": best_d.goodput_per_dollar,
                "best_per_dollar_point": [best_d.n_prefill, best_d.n_decode, best_d.cost_per_hour],
            }
            print(f"{tname:22} {s:22} best P={best.n_prefill} D={best.n_decode} {best.goodput_rps:8.2f} r/s "
                  f"{best_d.goodput_per_dollar:8.0f} req/$  ({time.perf_counter() - t0:.1f} s)")
    out["sim_search"] = search_out
    out["sim_search_setup"] = {"model": a.model, "budget_per_hour": a.budget, "price": a.price,
                               "requests_per_trace": a.n, "slo": {t: systems.slo(t) for t in MAIN_TRACES},
                               "attainment": systems.systems_table()["attainment"]}
    for tname in MAIN_TRACES:
        so = search_out[tname]
        full = so["hma-serve"]
        for base in ("homo-h100-bf16", "homo-gddr-bf16"):
            b = so[base]
            out[f"sim_goodput_ratio_{tname}_vs_{base}"] = full["best"][3] / b["best"][3] if b["best"][3] else None
            out[f"sim_goodput_per_dollar_ratio_{tname}_vs_{base}"] = (
                full["best_goodput_per_dollar"] / b["best_goodput_per_dollar"] if b["best_goodput_per_dollar"] else None)

    # goodput figure
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    w = 0.8 / len(MAIN_TRACES)
    for i, tname in enumerate(MAIN_TRACES):
        g = [search_out[tname][s]["best"][3] for s in names]
        gd = [search_out[tname][s]["best_goodput_per_dollar"] for s in names]
        axes[0].bar(np.arange(len(names)) + i * w, g, w, label=tname)
        axes[1].bar(np.arange(len(names)) + i * w, gd, w, label=tname)
    for ax, yl in zip(axes, ("goodput (req/s at 90% SLO)", "goodput per dollar (req/$)")):
        ax.set_xticks(np.arange(len(names)) + 0.4 - w / 2, names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(yl)
        ax.legend(fontsize=7)
    fig.suptitle(f"{a.model}, budget ${a.budget}/h ({a.price}), best P:D per system")
    fig.tight_layout()
    fig.savefig(RESULTS / "sim_goodput.png", dpi=110)
    plt.close(fig)

    # TTFT/TPOT distributions at one common rate (the H100 baseline's goodput) on azure_conv
    tname = MAIN_TRACES[0]
    tr = _trace(tname, a.n)
    rate = search_out[tname]["homo-h100-bf16"]["best"][3]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    dist: dict = {}
    for s in names:
        p, d = search_out[tname][s]["best"][:2]
        r = S.replay(systems.build_cluster(a.model, s, p, d, a.price), tr.at_rate(rate))
        for ax, x in zip(axes, (r.ttft, r.tpot)):
            x = np.sort(x[np.isfinite(x)])
            ax.plot(x, np.arange(1, len(x) + 1) / len(x), label=f"{s} ({p}P:{d}D)")
        dist[s] = {"ttft_p50": float(np.nanpercentile(r.ttft, 50)), "ttft_p90": float(np.nanpercentile(r.ttft, 90)),
                   "tpot_p50": float(np.nanpercentile(r.tpot, 50)), "tpot_p90": float(np.nanpercentile(r.tpot, 90))}
    lo, hi = systems.slo(tname)
    for ax, lab, sl in zip(axes, ("TTFT (s)", "TPOT (s)"), (lo, hi)):
        ax.set_xscale("log")
        ax.axvline(sl, color="k", ls="--", lw=0.8)
        ax.set_xlabel(lab)
        ax.set_ylabel("CDF")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{a.model}, {tname} at {rate:.1f} req/s, best P:D under ${a.budget}/h")
    fig.tight_layout()
    fig.savefig(RESULTS / "sim_cdf.png", dpi=110)
    plt.close(fig)
    out["sim_distributions_azure_conv"] = {"rate_rps": rate, **dist}

    out.update({k: v for k, v in kept_keys(RESULTS / "sim.json").items() if k not in out})
    with open(RESULTS / "sim.json", "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {RESULTS / 'sim.json'}")


def cmd_energy(a: argparse.Namespace) -> dict:
    """The paper pairing at each system's goodput (best P:D of the same search as ``all``)."""
    names = a.traces.split(",")
    out: dict = {
        "command": f"python -m eval.sim energy --model {a.model} --budget {a.budget:g} --price {a.price} "
                   f"--n {a.n} --traces {a.traces}",
        "power_source": E.power_source(tuple(sorted({d for s in E.PAIRING for d in (
            systems.load_system(s).prefill, systems.load_system(s).decode)}))),
        "paper": E.PAPER,
        "setup": {"model": a.model, "budget_per_hour": a.budget, "price": a.price, "requests_per_trace": a.n,
                  "slo": {t: systems.slo(t) for t in names}, "attainment": systems.systems_table()["attainment"],
                  "systems": {s: systems.load_system(s).label for s in E.PAIRING}},
        "traces": {},
    }
    for tname in names:
        tr = _trace(tname, a.n)
        lo, hi = systems.slo(tname)
        rows: dict = {}
        for s in E.PAIRING:
            best = max(S.search(a.model, tr, s, a.budget, a.price), key=lambda p: p.goodput_rps)
            if best.goodput_rps <= 0:
                raise SystemExit(f"{s} on {tname}: goodput 0 under the SLO, no rate to measure energy at")
            spec = systems.build_cluster(a.model, s, best.n_prefill, best.n_decode, a.price)
            at = tr.at_rate(best.goodput_rps)
            r = S.replay(spec, at)
            sysd = systems.load_system(s)
            rows[s] = E.system_row(best.goodput_rps, spec.cost_per_hour, E.replay_energy(spec, r, at.output_len),
                                   n_prefill=best.n_prefill, n_decode=best.n_decode, prefill=sysd.prefill,
                                   decode=sysd.decode, slo_attainment=S.attainment(r, lo, hi))
            rows[s]["joules_per_request_at_idle_fraction"] = {
                str(f): E.replay_energy(spec, r, at.output_len, f).joules_per_request for f in E.IDLE_SENSITIVITY}
        rows.update(E.pairing_ratios(rows[E.PAIRING[0]], rows[E.PAIRING[1]]))
        rows["ratio_joules_per_request_at_idle_fraction"] = {
            k: v / rows[E.PAIRING[1]]["joules_per_request_at_idle_fraction"][k]
            for k, v in rows[E.PAIRING[0]]["joules_per_request_at_idle_fraction"].items()}
        out["traces"][tname] = rows
    print(E.format_table(out))
    print(out["power_source"])
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m eval.sim")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("vendor-traces")
    v = sub.add_parser("validate")
    v.add_argument("--source", default="auto", choices=("auto", "harness", "reference"))
    v.add_argument("--write", action="store_true", help="update the validation keys of eval/results/sim.json")
    v.add_argument("--harness-file", default=None, help="measure_cpu_pd.py output (default eval/results/cpu_pd_measured.json)")
    v.add_argument("--repeat", action="store_true",
                   help="with --write and --harness-file: write the sim_repeat_* keys (a repeat session) instead")
    x = sub.add_parser("extrapolate", help="fit on short prompts at one link rate, predict long ones and another rate")
    x.add_argument("--calib", required=True, help="eval/bench_ttft.py output the constants are fitted on")
    x.add_argument("--other", default=None, help="a bench_ttft.py output at another link rate (all predicted)")
    x.add_argument("--short-max", type=int, default=X.SHORT_MAX, help="longest calibration prompt")
    x.add_argument("--attn-ratio", type=float, default=None,
                   help="F_gemm / F_attn when --calib has < 3 short lengths (default: validate's harness fit)")
    x.add_argument("--link-groups", default="config", choices=("config", "schedule"))
    x.add_argument("--kernel-rates", default=None,
                   help="`kernel-rates` output: price the prefill by kernel rates measured at each length")
    x.add_argument("--kernel-form", default="additive", choices=X.kernel_rates.FORMS,
                   help="the rest of the forward: a per-token cost beside the kernels, or a factor on them")
    x.add_argument("--write", action="store_true", help="merge the sim_extrapolation_* keys into eval/results/sim.json")
    k = sub.add_parser("kernel-rates", help="time one layer's GEMMs and attention at each length on this machine")
    k.add_argument("--model", default="smollm2-135m")
    k.add_argument("--lengths", default="256,512,1024,2048,4096")
    k.add_argument("--dtype", default="float32", choices=X.kernel_rates.DTYPES)
    k.add_argument("--threads", type=int, default=1, help="torch threads (bench_ttft's --prefill-threads)")
    k.add_argument("--reps", type=int, default=3)
    k.add_argument("--out", default=str(RESULTS / "kernel_rates.json"))
    r = sub.add_parser("replay")
    for k in ("model", "system"):
        r.add_argument(k)
    r.add_argument("p", type=int)
    r.add_argument("d", type=int)
    r.add_argument("trace")
    r.add_argument("--rate", type=float, default=0.0)
    r.add_argument("--n", type=int, default=10000)
    s = sub.add_parser("search")
    s.add_argument("model")
    s.add_argument("trace")
    s.add_argument("budget", type=float)
    s.add_argument("--systems", default="")
    s.add_argument("--price", default="on_demand")
    s.add_argument("--n", type=int, default=2000)
    al = sub.add_parser("all")
    al.add_argument("--model", default="qwen3-8b")
    al.add_argument("--budget", type=float, default=24.0)
    al.add_argument("--price", default="on_demand")
    al.add_argument("--n", type=int, default=2000)
    al.add_argument("--source", default="auto", choices=("auto", "harness", "reference"))
    en = sub.add_parser("energy", help="goodput, goodput per $/h and joules per request for the paper pairing")
    en.add_argument("--model", default="qwen3-8b")
    en.add_argument("--budget", type=float, default=24.0)
    en.add_argument("--price", default="on_demand")
    en.add_argument("--n", type=int, default=2000)
    en.add_argument("--traces", default=",".join(MAIN_TRACES))
    en.add_argument("--out", default=str(RESULTS / "sim_energy.json"))
    argv = sys.argv[1:] if argv is None else argv
    a = ap.parse_args(argv)
    if a.cmd == "vendor-traces":
        for p in trace.vendor():
            print(p)
    elif a.cmd == "validate":
        cmd_validate(a)
    elif a.cmd == "extrapolate":
        cmd_extrapolate(a, argv)
    elif a.cmd == "kernel-rates":
        cmd_kernel_rates(a)
    elif a.cmd == "replay":
        cmd_replay(a)
    elif a.cmd == "search":
        cmd_search(a)
    elif a.cmd == "energy":
        cmd_energy(a)
    else:
        cmd_all(a)


if __name__ == "__main__":
    sys.exit(main())
