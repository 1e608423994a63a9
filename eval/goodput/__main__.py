"""Goodput on traces, stock SGLang PD vs memha, on the shaped P->D link (issue 7).

``.venv/bin/python -m eval.goodput`` (root: network namespaces) runs every configuration on every
trace and writes ``eval/results/goodput.json``, ``goodput.png`` (SLO attainment vs rate),
``goodput_cdf.png`` (TTFT/TPOT CDFs) and ``goodput_summary.md``. It prints the plan and its time
estimate before starting. ``--quick``: a smoke run (one trace, stock + memha fp8 pipelined,
10 requests, 2 rates) into ``goodput_quick.*``. ``--plan-only``: print the plan and exit.
``--table-from JSON``: print the markdown summary of a results file (and redraw its plots);
``--table-from A.json B.json --out C.json``: merge runs of different traces (e.g. one trace per
command, to fit a session) into C.json, its summary and plots.
``--repeats-from A.json B.json --out H.json``: repeated runs of one experiment; H.json gets each
run's ``goodput_ratio`` and the lowest over them (the headline in ``eval/RESULTS.md``).
``--windows K --window-stride S``: K windows per trace at offsets ``--offset`` + i x S, one results
file each (``goodput_<trace>_w<offset>.json`` beside ``--out``; finished ones are skipped, so the
same command goes on in a later session), then their merge as with ``--windows-from``.
``--windows-from A.json B.json ... --out W.json``: the memha / stock ratio per trace window, its
geometric mean and bootstrap 90 % interval per trace and overall (``confidence.py``), W.json,
its summary and ``W.png`` (error bars).

SLOs (per trace, fixed before the sweep from the stock cluster run one request at a time on the
same link): TTFT <= k_ttft x stock TTFT at the window's p90 prompt length; TPOT <= k_tpot x stock
TPOT. The p90 anchor is what lets the idle stock cluster meet the TTFT SLO for ~90 % of the
window (an SLO from the median length would fail the longest requests even with no load, so
stock goodput would be 0 by construction); the k's are the queueing allowance.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import time

import numpy as np

from eval.goodput import plan as plan_mod
from eval.goodput import prompts as prompts_mod
from eval.goodput import confidence, report, runner, windows
from eval.goodput.metrics import SLO, TARGET
from eval.goodput.prices import COLUMNS, hourly_cost, load_prices
from eval.goodput.workload import Scaling, load_window
from eval.pd_configs import COMPUTE_DTYPES, PD_CONFIGS, ROOT, matched_link_rate, recorded_link_rate

RESULTS = os.path.join(ROOT, "eval", "results")
CONFIGS = ["stock_bf16", "memha_fp8_whole", "memha_fp8_pipelined", "memha_int4_pipelined",
           "memha_fp8_pipelined_eager"]
TRACES = ["azure_code", "mooncake_conversation"]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.goodput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--traces", default=",".join(TRACES), help="comma-separated, from eval/traces/")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(PD_CONFIGS)}")
    ap.add_argument("--n", type=int, default=20, help="requests per run (a window of the trace)")
    ap.add_argument("--offset", type=int, default=0, help="index of the window's first request")
    ap.add_argument("--length-scale", type=float, default=1 / 8, help="input and output lengths x this")
    ap.add_argument("--max-input", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=32)
    ap.add_argument("--k-ttft", type=float, default=2.0, help="TTFT SLO = k x unloaded stock TTFT at p90 length")
    ap.add_argument("--k-tpot", type=float, default=3.0, help="TPOT SLO = k x unloaded stock TPOT")
    ap.add_argument("--ttft-slo", type=float, help="fixed TTFT SLO (s) for every trace: no calibration")
    ap.add_argument("--tpot-slo", type=float, help="fixed TPOT SLO (s), with --ttft-slo")
    ap.add_argument("--target", type=float, default=TARGET, help="attainment that counts as meeting the SLO")
    ap.add_argument("--start-factor", type=float,
                    help="first rate = this x 1 / (mean unloaded stock TTFT over the window); "
                         "default 1 (0.5 with --quick)")
    ap.add_argument("--step", type=float, default=2 ** 0.5, help="geometric rate step of the search")
    ap.add_argument("--refine", type=int, default=1, help="bisections once the goodput is bracketed")
    ap.add_argument("--max-runs", type=int, default=7, help="runs per configuration at most")
    ap.add_argument("--calibration-reps", type=int, default=2)
    ap.add_argument("--rate", default="recorded",
                    help="link rate: 'recorded' (issue 5's, from eval/results/ttft.json), a tc rate, "
                         "or 'auto:SECONDS' (the rule applied to a 4K prefill time)")
    ap.add_argument("--prefill-threads", type=int, default=1, help="torch threads of the prefill server")
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="torch threads of the decode server (0 = torch's default; see eval/pd_configs.py)")
    ap.add_argument("--compute-dtype", default="model", choices=COMPUTE_DTYPES,
                    help="float32: fp32 compute, bf16 KV cache (as eval/bench_ttft.py; match --rate to it)")
    ap.add_argument("--text", default="auto", choices=("auto", "sharegpt", "os-text"), help="prompt text source")
    ap.add_argument("--subnet", default="10.200.77", help="shaped link subnet (pick one no one else uses)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 trace, 2 configs, 10 requests, 2 rates")
    ap.add_argument("--plan-only", action="store_true")
    ap.add_argument("--out", help="results JSON (default eval/results/goodput.json, goodput_quick.json)")
    ap.add_argument("--log-dir", default="/tmp/memha-goodput")
    ap.add_argument("--table-from", metavar="JSON", nargs="+",
                    help="print the summary of a results file and redraw its plots; with several "
                         "files (runs of different traces), merge them into --out first")
    ap.add_argument("--repeats-from", metavar="JSON", nargs="+",
                    help="repeated runs of one experiment: write the lowest goodput_ratio over them "
                         "(and each run's) to --out")
    ap.add_argument("--windows-from", metavar="JSON", nargs="+",
                    help="runs of different windows (offsets) of the traces: per-window ratios, their "
                         "geometric mean and bootstrap 90%% interval per trace and overall, to --out")
    ap.add_argument("--windows", type=int, default=0, metavar="K",
                    help="run K windows of each trace (offsets --offset + i x --window-stride), a file each")
    ap.add_argument("--window-stride", type=int, default=1000, metavar="S", help="requests between windows")
    ap.add_argument("--ratio-config", default=report.MEMHA, help="the memha config of the windows' ratio")
    ap.add_argument("--bootstrap", type=int, default=confidence.N_RESAMPLES, help="bootstrap resamples")
    a = ap.parse_args(argv)
    if a.quick:
        a.traces = a.traces.split(",")[0]
        if a.configs == ",".join(CONFIGS):
            a.configs = "stock_bf16,memha_fp8_pipelined"
        a.n, a.max_runs, a.refine, a.calibration_reps = min(a.n, 10), 2, 0, 1
    a.start_factor = a.start_factor or (0.5 if a.quick else 1.0)
    if sum(map(bool, (a.repeats_from, a.table_from, a.windows_from, a.windows))) > 1:
        ap.error("--repeats-from, --table-from, --windows-from and --windows: one at a time")
    if a.repeats_from and not a.out:
        ap.error("--repeats-from writes a new file: name it with --out (e.g. eval/results/goodput_headline.json)")
    if a.windows and a.window_stride < a.n:  # windows that share requests are not separate samples
        ap.error(f"--window-stride {a.window_stride} < --n {a.n}: the windows would overlap")
    default_out = "goodput_windows.json" if a.windows_from or a.windows else (
        "goodput_quick.json" if a.quick else "goodput.json")
    a.out = a.out or os.path.join(RESULTS, default_out)
    if (a.ttft_slo is None) != (a.tpot_slo is None):
        ap.error("--ttft-slo and --tpot-slo go together")
    a.configs = a.configs.split(",")
    for c in a.configs + [a.ratio_config]:
        if c not in PD_CONFIGS:
            ap.error(f"unknown config {c!r}; known: {', '.join(PD_CONFIGS)}")
    if a.windows and a.ratio_config not in a.configs:
        ap.error(f"--windows: the ratio's config {a.ratio_config} is not in --configs")
    if a.ttft_slo is None and a.configs[0] != "stock_bf16":
        if "stock_bf16" not in a.configs:
            ap.error("the SLOs are calibrated on stock_bf16: include it, or give --ttft-slo/--tpot-slo")
        a.configs.remove("stock_bf16")
        a.configs.insert(0, "stock_bf16")
    a.traces = a.traces.split(",")
    return a


def link_rate(spec: str) -> str:
    if spec == "recorded":
        return recorded_link_rate()
    if spec.startswith("auto:"):
        return matched_link_rate(float(spec.split(":", 1)[1]))
    return spec


def progress_factory():
    try:
        from tqdm import tqdm

        return lambda total, desc: tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stdout)
    except ImportError:
        class Bar:
            def __init__(self, total, desc):
                self.total, self.desc, self.n = total, desc, 0

            def update(self, k):
                self.n += k
                print(f"    {self.desc}: {self.n}/{self.total} requests", flush=True)

            def close(self):
                pass
        return Bar


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    out_base = _base(a.out)
    if a.windows_from:
        windows_summary(a, a.windows_from, _command(argv))
        return
    if a.repeats_from:
        parts = _load(a.repeats_from)
        names = [os.path.basename(p)[:-5] for p in a.repeats_from]
        out = report.repeats(parts, names)
        _write(out, a.out)
        print(json.dumps(out, indent=1))
        return
    if a.table_from:
        parts = _load(a.table_from)
        out = report.merge(parts) if len(parts) > 1 else parts[0]
        report.summarize(out)
        md = report.markdown_table(out)
        print(md)
        base = a.table_from[0][:-5]
        if len(parts) > 1:  # a new results file: JSON, summary and plots under --out
            base = out_base
            out["merged_from"] = [os.path.relpath(p, ROOT) for p in a.table_from]
            _write(out, a.out)
            with open(base + "_summary.md", "w") as f:
                f.write(md + "\n")
        report.plot(out, base + ".png", base + "_cdf.png")
        return
    if a.windows:
        run_windows(a, _command(argv))
        return
    measure(a, _command(argv))


def run_windows(a: argparse.Namespace, command: str) -> None:
    """The plan of ``--windows`` (estimate first), one ``measure`` per window not yet finished, then
    the windows summary of every finished file of the plan."""
    scaling = Scaling(a.length_scale, max_input=a.max_input, max_output=a.max_output)
    plan = windows.plan_windows(a.traces, a.windows, a.window_stride, a.offset, os.path.dirname(a.out))
    try:
        est_s, lines = windows.estimate(plan, a.configs, a.n, scaling, _settings(a))
    except ValueError as e:  # a window past the end of its trace: say so before anything runs
        sys.exit(f"eval.goodput --windows: {e}")
    todo = [w for w in plan if not w.done]
    print(f"goodput windows: {len(a.traces)} trace(s) x {a.windows} windows of {a.n} requests every "
          f"{a.window_stride} from #{a.offset}, {len(a.configs)} configs; {len(todo)} of {len(plan)} to run")
    print("\n".join(lines))
    print(f"estimated wall time of what is left: ~{est_s / 60:.0f} min (plan.py's model; each window's run "
          f"prints its own); rerun the same command to go on", flush=True)
    if a.plan_only:
        return
    for w in todo:
        one = copy.copy(a)
        one.traces, one.offset, one.out, one.windows = [w.trace], w.offset, w.path, 0
        measure(one, f"{command}  # window {w.trace} @{w.offset}")
    done = [w.path for w in plan if windows.finished(w.path)]
    if done:
        windows_summary(a, done, command)


def windows_summary(a: argparse.Namespace, paths: list[str], command: str) -> dict:
    """Ratio per window, geometric mean and bootstrap 90 % interval (``confidence``) -> a.out, its
    markdown summary and plot."""
    names = [os.path.relpath(p, ROOT) for p in paths]
    out = confidence.summarize_windows(_load(paths), names, a.ratio_config, a.bootstrap)
    out.update({"command": command, "date": dt.datetime.now().isoformat(timespec="seconds")})
    _write(out, a.out)
    md = windows.markdown_table(out)
    with open(_base(a.out) + "_summary.md", "w") as f:
        f.write(md + "\n")
    png = windows.plot(out, _base(a.out) + ".png")
    print(md)
    print(f"wrote {a.out}, {_base(a.out)}_summary.md, {png}")
    return out


def measure(a: argparse.Namespace, command: str) -> None:
    """One run: every configuration on every trace's window (``a.offset``, ``a.n``) -> a.out."""
    out_base = _base(a.out)
    scaling = Scaling(a.length_scale, max_input=a.max_input, max_output=a.max_output)
    workloads = {t: load_window(t, a.n, a.offset, scaling) for t in a.traces}
    rate = link_rate(a.rate)
    settings = _settings(a)
    print(f"goodput: {len(a.traces)} trace(s) x {len(a.configs)} configs, {a.n} requests per run, "
          f"P->D link {rate}, lengths x{a.length_scale:g} (input <= {a.max_input}, output <= {a.max_output})")
    for t, wl in workloads.items():
        print(f"  {t}: requests {a.offset}..{a.offset + a.n - 1}, native {wl.native_rate:.3f} req/s, input "
              f"p50/p90 {np.percentile(wl.input_len, 50):.0f}/{np.percentile(wl.input_len, 90):.0f}, "
              f"output p50 {np.percentile(wl.output_len, 50):.0f}")
    est_s, lines = plan_mod.estimate(workloads, a.configs, settings)
    print("\n".join(lines))
    print(f"estimated wall time: ~{est_s / 60:.0f} min (model in eval/goodput/plan.py; the box's load moves it)",
          flush=True)
    if a.plan_only:
        return

    from sglang_memha.testing.netns import ShapedLink, netns_available
    ok, why = netns_available()
    if not ok:
        sys.exit(f"eval.goodput needs network namespaces for the shaped link: {why}")
    from transformers import AutoTokenizer

    from sglang_memha.models.smollm2 import ensure_smollm2
    from sglang_memha.testing.transfer_log import transfer_rows

    model = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(model)
    t_start = time.monotonic()
    prices = load_prices()
    usd = {col: hourly_cost(prices, prices["deployment"], col) for col in COLUMNS}
    out = _header(a, command, rate, scaling, settings, prices, usd, est_s)
    eta = _Eta(est_s, settings, t_start)
    with ShapedLink(rate=rate, prefix="memhag", subnet=a.subnet) as link:
        for trace, wl in workloads.items():
            p90 = int(np.percentile(wl.input_len, 90))
            source, pool = prompts_mod.token_pool(tok, int(wl.input_len.sum()) + 2 * a.calibration_reps * p90, a.text)
            prompts = prompts_mod.cut_prompts(wl.input_len.tolist(), pool)
            out.update({f"window_offset_{trace}": a.offset, f"native_rate_{trace}": round(wl.native_rate, 4),
                        f"input_len_p50_{trace}": int(np.percentile(wl.input_len, 50)), f"input_len_p90_{trace}": p90,
                        f"output_len_mean_{trace}": round(float(wl.output_len.mean()), 2), "text_source": source})
            out["cdf"][trace] = {}
            slo = None if a.ttft_slo is None else SLO(a.ttft_slo, a.tpot_slo)
            start = None if slo is None else a.start_factor * plan_mod.TTFTModel().capacity("stock_bf16", wl.input_len)
            for config in a.configs:
                t_cfg = time.monotonic()
                print(f"[{trace}] {config}: {PD_CONFIGS[config].label} "
                      f"({(time.monotonic() - t_start) / 60:.1f} min elapsed)", flush=True)
                with runner.start_cluster(config, model, link, int(wl.input_len.max()), a.prefill_threads,
                                          a.decode_threads, os.path.join(a.log_dir, trace), a.compute_dtype) as c:
                    runner.warm_up(c, pool[:128].tolist())
                    if slo is None:  # the first configuration is stock: calibrate the SLOs on it
                        cal = runner.calibrate(c, wl, lambda ls: prompts_mod.cut_prompts(ls, pool), a.calibration_reps)
                        slo, start = cal.slo(a.k_ttft, a.k_tpot), a.start_factor * cal.capacity_estimate(wl.input_len)
                        out[f"calibration_{trace}"] = cal.as_dict()
                    out.update({f"slo_ttft_s_{trace}": round(slo.ttft_s, 4),
                                f"slo_tpot_s_{trace}": round(slo.tpot_s, 4),
                                f"search_start_rate_{trace}": round(start, 4)})
                    print(f"  SLO TTFT <= {slo.ttft_s:.2f} s, TPOT <= {slo.tpot_s * 1e3:.0f} ms; "
                          f"search from {start:.3f} req/s", flush=True)
                    points = runner.sweep(c, config, wl, prompts, slo, _search(a, start), a.target,
                                          progress_factory())
                    rows = [r for r in transfer_rows(c.logs()["prefill"]) if r.status == "ok"]
                _record(out, trace, config, points, slo, usd, a.target, rows)
                print(f"  goodput {out[f'goodput_{trace}_{config}']} req/s "
                      f"({out[f'goodput_status_{trace}_{config}']}); {eta.after(wl, config, t_cfg)}", flush=True)
                _write(out, a.out)
    report.summarize(out)
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    _write(out, a.out)
    md = report.markdown_table(out)
    with open(out_base + "_summary.md", "w") as f:
        f.write(md + "\n")
    pngs = report.plot(out, out_base + ".png", out_base + "_cdf.png")
    print(md)
    print(f"wrote {a.out}, {out_base}_summary.md, {', '.join(pngs)}; {out['wall_s'] / 60:.1f} min "
          f"(estimated {est_s / 60:.0f})")


def _command(argv: list[str] | None) -> str:
    return "python -m eval.goodput " + " ".join(argv if argv is not None else sys.argv[1:])


def _base(path: str) -> str:
    return path[:-5] if path.endswith(".json") else path


def _search(a: argparse.Namespace, start: float) -> runner.Search:
    return runner.Search(start, a.step, a.refine, max_runs=a.max_runs)


def _settings(a: argparse.Namespace) -> plan_mod.Settings:
    s = _search(a, 1.0)
    return plan_mod.Settings(a.k_ttft, a.k_tpot, a.start_factor, a.step, s.resolution, s.span, a.max_runs,
                             a.calibration_reps, a.target)


def _header(a, command: str, rate: str, scaling: Scaling, settings, prices: dict, usd: dict, est_s: float) -> dict:
    return {"command": command,
            "date": dt.datetime.now().isoformat(timespec="seconds"), "model": "SmolLM2-135M-Instruct",
            "machine": f"{os.cpu_count()} CPU cores, --device cpu, torch_native attention, all servers on one box",
            "link_rate": rate, "prefill_threads": a.prefill_threads, "decode_threads": a.decode_threads,
            "compute_dtype": a.compute_dtype,
            "traces": a.traces, "configs": a.configs, "n_requests": a.n, "target_attainment": a.target,
            "length_scale": a.length_scale, "min_input": scaling.min_input, "max_input": a.max_input,
            "min_output": scaling.min_output, "max_output": a.max_output, "k_ttft": a.k_ttft, "k_tpot": a.k_tpot,
            "search_step": round(a.step, 4), "search_resolution": round(settings.resolution, 4),
            "router_args": runner.ROUTER_ARGS, "deployment": prices["deployment"],
            "usd_per_hour_on_demand": usd["on_demand"], "usd_per_hour_spot": usd["spot"],
            "estimated_wall_s": round(est_s), "runs": [], "cdf": {}}


def _record(out: dict, trace: str, config: str, points, slo: SLO, usd: dict, target: float, rows) -> None:
    flat, cdf = report.flatten(trace, config, points, slo, usd, target)
    out.update(flat)
    if rows:  # measured wire bytes (Mooncake-reported) per prompt token, all runs of this config
        out[f"kv_bytes_per_token_{trace}_{config}"] = round(
            sum(r.kv_bytes for r in rows) / (16 * sum(r.pages for r in rows)), 1)
    if cdf:
        out["cdf"][trace][config] = cdf
    out["runs"] += [{"trace": trace, "config": config, **p.summary(slo)} for p in points]


class _Eta:
    """Time left = the plan's estimate for what is left, scaled by how the estimate fared so far."""

    def __init__(self, est_s: float, settings, t_start: float):
        self.est_s, self.settings, self.t_start = est_s, settings, t_start
        self.done_s = self.est_done = 0.0

    def after(self, wl, config: str, t_cfg: float) -> str:
        self.done_s += time.monotonic() - t_cfg
        self.est_done += plan_mod.estimate({wl.trace: wl}, [config], self.settings)[0]
        left = max(0.0, self.est_s - self.est_done) * self.done_s / max(self.est_done, 1.0)
        return f"{(time.monotonic() - self.t_start) / 60:.1f} min elapsed, ~{left / 60:.0f} min left"


def _load(paths: list[str]) -> list[dict]:
    parts = []
    for path in paths:
        with open(path) as f:
            parts.append(json.load(f))
    return parts


def _write(out: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
