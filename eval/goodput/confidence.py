"""The memha / stock goodput ratio with a confidence bound across trace windows (issue 22).

One ``python -m eval.goodput`` run measures one *window* per trace: ``n_requests`` requests from
``window_offset_<trace>``. A ratio from one window says little about the trace, so several windows
per trace (different offsets) are merged here:

1. per (trace, window): ``goodput_<trace>_<memha> / goodput_<trace>_stock_bf16`` by
   ``report.ratio`` (which reads the search statuses); repeats of one window are one window;
2. per trace: the geometric mean of its window ratios (ratios multiply, so the mean of their
   logs), and a percentile bootstrap of that mean over the windows;
3. overall: a stratified bootstrap: each replicate resamples the windows *within* each trace and
   takes the geometric mean of the per-trace geometric means (every trace weighs the same,
   however many windows it has).

Inputs: loaded results JSONs (one or more windows each) and their names. Output: flat keys,
``summarize_windows``' docstring lists them. Pure numpy, no servers.
"""
from __future__ import annotations

import zlib

import numpy as np

from eval.goodput.report import BASE, EXPERIMENT_SETTINGS, MEMHA, differing_setting, ratio

N_RESAMPLES = 10_000
SEED = 22  # fixed: the same files give the same bound on every machine
LOW_Q, HIGH_Q = 5.0, 95.0  # the two-sided 90 % interval; its low end is a one-sided 95 % bound
MIN_WINDOWS = 3
TARGET_RATIO = 1.5
# "lower bound": memha passed at the top of its tested range, so the true ratio is at least the
# value; counting it at the value can only lower the bound (conservative), so it is kept.
INCLUDED_KINDS = ("measured", "lower bound")
METHOD = (f"percentile bootstrap ({{n}} resamples, seed {{seed}}) of the geometric mean of the per-window "
          f"ratios; per trace: windows resampled with replacement; overall: stratified (windows resampled "
          f"within each trace, per-trace geometric means combined with equal weight); ci_low/ci_high = "
          f"the {LOW_Q:g}th/{HIGH_Q:g}th percentiles (two-sided 90 %, ci_low a one-sided 95 % lower bound)")


def exclusion_reason(kind: str, memha: str) -> str | None:
    """Why a window with this ``report.ratio`` kind stays out of the bound (None: it counts)."""
    if kind in INCLUDED_KINDS:
        return None
    if kind == "missing":
        return f"no goodput for {memha} or {BASE} in this file"
    if kind == "upper bound":
        # stock passed at the top of its tested range: the true ratio may be lower than the value,
        # which would overstate a lower bound; rerun the window with a larger --max-runs
        return "upper bound only (stock passed at the top of its tested range)"
    return kind  # report.ratio's own text: stock goodput 0, or both searches unbracketed


def window_ratios(parts: list[dict], names: list[str], memha: str = MEMHA) -> tuple[dict, dict]:
    """(included, excluded), each {trace: [record, ...]} sorted by offset.

    included record: ``{"offset", "n", "ratio", "kind", "from"}``; a window found in several
    files (repeats of one window) enters once, as the geometric mean of its repeats, so it is
    not counted as independent windows. excluded record: ``{"offset", "from", "reason"}``.
    ValueError when the files differ in a setting that defines the experiment."""
    for name, part in zip(names, parts):
        key = differing_setting(parts[0], part)
        if key:
            raise ValueError(f"windows of different experiments: {key} differs in {name} "
                             f"({parts[0].get(key)!r} vs {part.get(key)!r})")
    found: dict[tuple[str, int], list[tuple[float, str, str]]] = {}
    excluded: dict[str, list[dict]] = {}
    for name, part in zip(names, parts):
        for trace in part["traces"]:
            if f"window_offset_{trace}" not in part:
                raise ValueError(f"{name}: no window_offset_{trace} (not a python -m eval.goodput results file?)")
            offset = int(part[f"window_offset_{trace}"])
            r, kind = ratio(part, trace, memha)
            why = exclusion_reason(kind, memha)
            if why is None:
                found.setdefault((trace, offset), []).append((r, kind, name))
            else:
                excluded.setdefault(trace, []).append({"offset": offset, "from": name, "reason": why})
    included: dict[str, list[dict]] = {}
    for (trace, offset), reps in sorted(found.items()):
        kinds = sorted({k for _, k, _ in reps})
        included.setdefault(trace, []).append({
            "offset": offset, "n": parts[0]["n_requests"], "ratio": round(gmean([r for r, _, _ in reps]), 4),
            "kind": kinds[0] if len(kinds) == 1 else " + ".join(kinds), "from": [n for _, _, n in reps]})
    for recs in excluded.values():
        recs.sort(key=lambda rec: rec["offset"])
    return included, excluded


def gmean(values) -> float:
    """Geometric mean; a zero (memha goodput 0 at the tested rates) makes it 0, on purpose."""
    with np.errstate(divide="ignore"):
        return float(np.exp(np.mean(np.log(np.asarray(values, dtype=np.float64)))))


def trace_rng(seed: int, trace: str) -> np.random.Generator:
    """A stream per trace: independent strata, and a trace's draws do not depend on which
    other traces are merged (seeding every trace alike would draw the same indices for all)."""
    return np.random.default_rng([seed, zlib.crc32(trace.encode())])


def bootstrap_gmeans(ratios: list[float], rng: np.random.Generator, n_resamples: int = N_RESAMPLES) -> np.ndarray:
    """[n_resamples] geometric means of ``len(ratios)`` ratios drawn with replacement."""
    logs = _logs(ratios)
    idx = rng.integers(0, len(logs), size=(n_resamples, len(logs)))
    return np.exp(logs[idx].mean(axis=1))


def interval(samples: np.ndarray) -> tuple[float, float]:
    """(5th, 95th) percentile of bootstrap replicates: the two-sided 90 % interval."""
    lo, hi = np.percentile(samples, [LOW_Q, HIGH_Q])
    return float(lo), float(hi)


def stratified_gmeans(per_trace: list[np.ndarray]) -> np.ndarray:
    """Replicate b of the overall ratio = geometric mean over traces of their replicate b (each
    trace's replicates come from its own windows only: the stratified bootstrap)."""
    return np.exp(np.mean([_logs(g) for g in per_trace], axis=0))


def summarize_windows(parts: list[dict], names: list[str], memha: str = MEMHA,
                      n_resamples: int = N_RESAMPLES, seed: int = SEED) -> dict:
    """Flat keys of the windows merge, per trace T (every trace with a window, excluded or not):

    ``goodput_ratio_windows_T`` (included windows: offset, n, ratio, kind, source files),
    ``goodput_ratio_excluded_T`` (offset, source, reason; only when some window is excluded),
    ``goodput_ratio_gmean_T``, ``goodput_ratio_ci_low_T`` (5th percentile of the bootstrap: the
    two-sided 90 % interval's low end, a one-sided 95 % lower bound), ``goodput_ratio_ci_high_T``
    (95th), ``goodput_ci_warning_T`` (fewer than 3 windows: the bound is not meaningful; no window:
    no bound, values None). Overall: ``goodput_ratio_gmean``, ``goodput_ratio_ci_low``,
    ``goodput_ratio_ci_high`` (stratified bootstrap over ``goodput_ratio_ci_traces``, the traces
    with a window), ``goodput_ratio_traces_ci_low_at_1_5x`` (traces whose ci_low >= 1.5) and
    ``goodput_ci_method``. Ratios are rounded to 4 decimals."""
    included, excluded = window_ratios(parts, names, memha)
    traces = list(dict.fromkeys(t for part in parts for t in part["traces"]))
    out = {"what": f"{memha} / {BASE} goodput per trace window, geometric mean and bootstrap interval",
           "memha_config": memha, "base_config": BASE, "windows_from": names, "traces": traces,
           "bootstrap_resamples": n_resamples, "bootstrap_seed": seed,
           "goodput_ci_method": METHOD.format(n=n_resamples, seed=seed)}
    out.update({k: parts[0].get(k) for k in EXPERIMENT_SETTINGS})  # equal in every part (checked)
    reps = {}
    for t in traces:
        wins = included.get(t, [])
        out[f"goodput_ratio_windows_{t}"] = wins
        if t in excluded:
            out[f"goodput_ratio_excluded_{t}"] = excluded[t]
        if not wins:
            out.update({f"goodput_ratio_{s}_{t}": None for s in ("gmean", "ci_low", "ci_high")})
            out[f"goodput_ci_warning_{t}"] = "no window with a defined ratio: no bound"
            continue
        if len(wins) < MIN_WINDOWS:
            out[f"goodput_ci_warning_{t}"] = (f"only {len(wins)} window(s): the bound is not meaningful "
                                              f"with fewer than {MIN_WINDOWS}")
        reps[t] = bootstrap_gmeans([w["ratio"] for w in wins], trace_rng(seed, t), n_resamples)
        _put(out, t, gmean([w["ratio"] for w in wins]), interval(reps[t]))
    out["goodput_ratio_ci_traces"] = list(reps)
    if reps:
        point = gmean([out[f"goodput_ratio_gmean_{t}"] for t in reps])
        _put(out, None, point, interval(stratified_gmeans(list(reps.values()))))
    else:
        out.update({"goodput_ratio_gmean": None, "goodput_ratio_ci_low": None, "goodput_ratio_ci_high": None})
    out["goodput_ratio_traces_ci_low_at_1_5x"] = sum(out[f"goodput_ratio_ci_low_{t}"] >= TARGET_RATIO for t in reps)
    return out


def _put(out: dict, trace: str | None, point: float, lo_hi: tuple[float, float]) -> None:
    tail = "" if trace is None else f"_{trace}"
    out[f"goodput_ratio_gmean{tail}"] = round(point, 4)
    out[f"goodput_ratio_ci_low{tail}"], out[f"goodput_ratio_ci_high{tail}"] = (round(v, 4) for v in lo_hi)


def _logs(values) -> np.ndarray:
    with np.errstate(divide="ignore"):  # log(0) = -inf -> a replicate that draws it is 0
        return np.log(np.asarray(values, dtype=np.float64))
