"""Several windows per trace (issue 22): the plan of a ``--windows K`` run, and the report of a
``--windows-from`` merge (markdown table, plot with error bars). The statistics live in
``confidence``; the runs themselves are ``__main__``'s, one per (trace, window).

A ``--windows K --window-stride S`` run measures windows at offsets ``offset, offset + S, ...``
of each trace, each into its own results file, ``goodput_<trace>_w<offset>.json``. A file that
holds a finished run (its ``wall_s`` is written last) is skipped, so rerunning the same command
in a later session goes on where the last one stopped, and the plan's estimate covers only what
is left.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from eval.goodput import plan as plan_mod
from eval.goodput.confidence import TARGET_RATIO
from eval.goodput.workload import Scaling, load_window


@dataclass(frozen=True)
class Window:
    trace: str
    offset: int
    path: str  # its results file
    done: bool  # the file holds a finished run


def window_path(out_dir: str, trace: str, offset: int) -> str:
    return os.path.join(out_dir, f"goodput_{trace}_w{offset}.json")


def finished(path: str) -> bool:
    """True when ``path`` holds a finished run (``wall_s`` is the last key a run writes)."""
    try:
        with open(path) as f:
            return "wall_s" in json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):  # not started, or cut off mid-write: run it
        return False


def plan_windows(traces: list[str], k: int, stride: int, first: int, out_dir: str) -> list[Window]:
    """The K windows of each trace, trace by trace (so a session that stops early has whole
    traces, which ``--windows-from`` can already bound)."""
    plan = []
    for trace in traces:
        for offset in (first + i * stride for i in range(k)):
            path = window_path(out_dir, trace, offset)
            plan.append(Window(trace, offset, path, finished(path)))
    return plan


def estimate(windows: list[Window], configs: list[str], n: int, scaling: Scaling,
             settings: plan_mod.Settings) -> tuple[float, list[str]]:
    """(seconds for the windows not yet done, one line per window) from ``plan.estimate``.
    ValueError (from ``workload.window``) when a window does not fit in its trace."""
    total, lines = 0.0, []
    for w in windows:
        if w.done:
            lines.append(f"  {w.trace:22s} window @{w.offset:<6d} done ({os.path.basename(w.path)})")
            continue
        sec, _ = plan_mod.estimate({w.trace: load_window(w.trace, n, w.offset, scaling)}, configs, settings)
        total += sec
        lines.append(f"  {w.trace:22s} window @{w.offset:<6d} ~{sec / 60:5.1f} min -> {os.path.basename(w.path)}")
    return total, lines


def markdown_table(out: dict) -> str:
    """Per trace: windows used / excluded, each window's ratio, geometric mean, 90 % interval."""
    lines = [f"{out['memha_config']} / {out['base_config']} goodput per window of {out['n_requests']} requests "
             f"(ratio @offset); geometric mean and bootstrap 90 % interval", "",
             "| trace | windows | ratio per window | gmean | 90 % interval | note |", "|---|---|---|---|---|---|"]
    for t in out["traces"]:
        wins, excl = out[f"goodput_ratio_windows_{t}"], out.get(f"goodput_ratio_excluded_{t}", [])
        per = ", ".join(f"{w['ratio']:.2f} @{w['offset']}" for w in wins) or "-"
        notes = [f"excluded @{e['offset']}: {e['reason']}" for e in excl]
        notes += [out[f"goodput_ci_warning_{t}"]] if f"goodput_ci_warning_{t}" in out else []
        lines.append(f"| {t} | {len(wins)}{f' (+{len(excl)} excluded)' if excl else ''} | {per} | "
                     f"{_num(out[f'goodput_ratio_gmean_{t}'])} | {_span(out, '_' + t)} | {'; '.join(notes) or '-'} |")
    lines.append(f"| **overall** ({len(out['goodput_ratio_ci_traces'])} traces, equal weight) | | | "
                 f"{_num(out['goodput_ratio_gmean'])} | {_span(out, '')} | stratified bootstrap |")
    lines += ["", f"`goodput_ratio_ci_low` = **{_num(out['goodput_ratio_ci_low'])}**; traces with ci_low >= "
                  f"{TARGET_RATIO:g}: {out['goodput_ratio_traces_ci_low_at_1_5x']}", "",
              f"Method: {out['goodput_ci_method']}."]
    return "\n".join(lines)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _span(out: dict, tail: str) -> str:
    lo, hi = out[f"goodput_ratio_ci_low{tail}"], out[f"goodput_ratio_ci_high{tail}"]
    return "-" if lo is None else f"[{lo:.2f}, {hi:.2f}]"


def plot(out: dict, png: str) -> str:
    """Per trace (and overall): the geometric-mean ratio with its 90 % interval as error bars,
    each window's ratio as a dot, a dashed line at the 1.5x goal."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t for t in out["traces"] if out[f"goodput_ratio_gmean_{t}"] is not None]
    fig, ax = plt.subplots(figsize=(1.8 * len(names) + 3.0, 4.2))
    for i, tail in enumerate([f"_{t}" for t in names] + [""]):
        g = out[f"goodput_ratio_gmean{tail}"]
        if g is None:
            continue
        lo, hi = out[f"goodput_ratio_ci_low{tail}"], out[f"goodput_ratio_ci_high{tail}"]
        ax.errorbar([i], [g], yerr=[[g - lo], [hi - g]], fmt="s", color="C0" if tail else "k",
                    capsize=6, markersize=7, label="geometric mean, 90 % interval" if i == 0 else None)
        wins = out.get(f"goodput_ratio_windows{tail}", [])
        # dots beside the bar (a small fixed shift per window), so they do not hide it
        xs = [i + 0.12 + 0.04 * j for j in range(len(wins))]
        ax.plot(xs, [w["ratio"] for w in wins], "o", color="C1", alpha=0.8,
                label="one window" if i == 0 else None)
    ax.axhline(TARGET_RATIO, color="k", linestyle="--", linewidth=1, label=f"{TARGET_RATIO:g}x goal")
    ax.set_xticks(range(len(names) + 1))
    ax.set_xticklabels(names + ["overall"])
    ax.set_ylabel(f"goodput {out['memha_config']} / {out['base_config']}")
    ax.set_ylim(bottom=0)
    ax.set_title(f"goodput ratio over windows of {out['n_requests']} requests (bootstrap 90 %)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png
