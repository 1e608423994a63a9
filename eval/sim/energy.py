"""Energy per request from the simulator's per-GPU busy time, and the paper-pairing table (issue 22).

One replay's energy, in joules, over the window [0, T] (T = the last completion, seconds from
the trace's time origin)::

    E = sum over instances g of  busy_g * P_busy_g + (T - busy_g) * P_idle_g
    J per request      = E / completed requests
    J per output token = E / sum of the completed requests' output tokens

busy_g (s) is what ``cluster.simulate`` accounts per instance (``SimResult.prefill_busy``: the
prefill batches it ran; ``SimResult.decode_busy``: the decode steps it ran); a KV transfer is not
busy time of either GPU. P_busy_g (W) is the device's datasheet power (``hardware.json``
``power_w``), P_idle_g (W) an idle figure from ``data/power.json`` (an assumption there, see its
sources). One instance = one GPU (the simulator has no tensor parallelism). A completed request
is one that did not fail to fit a pool, within its SLO or not.

The paper pairing (``python -m eval.sim energy``): GDDR prefill + HBM decode (``hma-serve``:
L40S -> H100) against homogeneous H100 PD (``homo-h100-bf16``), each at its best P:D under one
budget and at its goodput rate (the largest rate with ``attainment`` of requests within SLO),
the same search as ``python -m eval.sim all``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .cluster import ClusterSpec, SimResult
from .config import DATA_DIR, load_device

PAIRING = ("hma-serve", "homo-h100-bf16")  # (GDDR prefill + HBM decode, homogeneous H100)
# What eval/RESULTS.md cites of the paper ("HBM Is Not All You Need"): up to 3.2x goodput and
# 4.8x goodput per dollar over homogeneous H100; no energy figure of the paper is cited there.
PAPER = {"goodput_ratio": 3.2, "goodput_per_dollar_ratio": 4.8,
         "what": "the paper's reported 'up to' gains of its GDDR-prefill + HBM-decode system over homogeneous "
                 "H100: goodput and goodput per dollar; it states no energy figure that RESULTS cites. Our "
                 "ratios are the simulator's under our assumptions, not a reproduction of the paper's setup"}
SYSTEM_KEYS = ("goodput_rps", "goodput_per_dollar_hour", "joules_per_request", "joules_per_output_token")
RATIO_KEYS = tuple(f"ratio_{k}" for k in SYSTEM_KEYS)
IDLE_SENSITIVITY = (0.0, 0.3)  # idle = this x datasheet power, beside power.json's figure (0 = busy energy only)


@dataclass(frozen=True)
class Power:
    """Board power of one device in watts, and where each figure comes from."""

    busy_w: float
    idle_w: float
    source: str

    def __post_init__(self) -> None:
        if not self.busy_w > 0:
            raise ValueError(f"Power.busy_w={self.busy_w!r} is not valid: expected a positive number (hardware.json power_w)")
        if not 0 <= self.idle_w <= self.busy_w:
            raise ValueError(f"Power.idle_w={self.idle_w!r} is not valid: expected 0 <= idle_w <= busy_w={self.busy_w}")


@lru_cache(maxsize=None)
def _power_table() -> dict:
    with open(DATA_DIR / "power.json") as f:
        return json.load(f)


def device_power(name: str, idle_fraction: float | None = None) -> Power:
    """Busy = hardware.json ``power_w`` (datasheet); idle = power.json's ``idle_w`` or fraction x busy.

    ``idle_fraction`` overrides both idle figures (idle = idle_fraction x busy), for sensitivity.
    """
    t = _power_table()
    busy = load_device(name).power_w
    entry = t["devices"].get(name, {})
    if idle_fraction is not None:
        return Power(busy, idle_fraction * busy, f"busy: datasheet; idle: {idle_fraction} x datasheet power")
    if "idle_w" in entry:
        return Power(busy, float(entry["idle_w"]), f"busy: datasheet; idle: {entry.get('kind', 'power.json')}")
    return Power(busy, t["idle_fraction_of_tdp"] * busy,
                 f"busy: datasheet; idle: assumption ({t['idle_fraction_of_tdp']} x datasheet power)")


def energy_joules(busy_s: np.ndarray, busy_w: np.ndarray, idle_w: np.ndarray, window_s: float) -> tuple[float, float]:
    """(busy joules, idle joules) of instances busy ``busy_s[g]`` seconds of a ``window_s`` window.

    busy_s, busy_w, idle_w: [n_instances] float (s, W, W). Busy longer than the window is an error.
    """
    busy_s, busy_w, idle_w = (np.asarray(x, dtype=np.float64) for x in (busy_s, busy_w, idle_w))
    if not busy_s.shape == busy_w.shape == idle_w.shape:
        raise ValueError(f"energy_joules: shapes differ: busy_s {busy_s.shape}, busy_w {busy_w.shape}, "
                         f"idle_w {idle_w.shape}")
    if np.any(busy_s < 0) or np.any(busy_s > window_s * (1 + 1e-9)):
        raise ValueError(f"energy_joules: busy_s={busy_s.tolist()} is not valid: expected 0 <= busy_s <= "
                         f"window_s={window_s}")
    idle_s = np.maximum(window_s - busy_s, 0.0)
    return float(busy_s @ busy_w), float(idle_s @ idle_w)


@dataclass(frozen=True)
class Energy:
    """Energy of one replay (joules) and what it is divided by."""

    busy_j: float
    idle_j: float
    requests: int  # completed requests
    output_tokens: int  # their output tokens
    window_s: float
    busy_s: tuple[float, ...]  # per instance: prefill instances first, then decode

    @property
    def joules(self) -> float:
        return self.busy_j + self.idle_j

    @property
    def joules_per_request(self) -> float:
        return self.joules / self.requests if self.requests else float("nan")

    @property
    def joules_per_output_token(self) -> float:
        return self.joules / self.output_tokens if self.output_tokens else float("nan")


def replay_energy(spec: ClusterSpec, r: SimResult, output_len: np.ndarray,
                  idle_fraction: float | None = None) -> Energy:
    """Energy of replay ``r`` of ``spec``; each instance's power is its device's (``PrefillSpec.name``)."""
    powers = [device_power(s.name, idle_fraction) for s in (*spec.prefill, *spec.decode)]
    busy = np.concatenate([r.prefill_busy, r.decode_busy])
    if len(busy) != len(powers):
        raise ValueError(f"replay_energy: {len(busy)} busy times for {len(powers)} instances (a replay of another spec?)")
    done = ~r.failed
    window = float(np.max(r.arrival[done] + r.e2e[done])) if done.any() else 0.0
    bj, ij = energy_joules(busy, np.array([p.busy_w for p in powers]), np.array([p.idle_w for p in powers]), window)
    return Energy(busy_j=bj, idle_j=ij, requests=int(done.sum()),
                  output_tokens=int(np.asarray(output_len)[done].sum()), window_s=window,
                  busy_s=tuple(float(b) for b in busy))


def system_row(goodput_rps: float, cost_per_hour: float, e: Energy, **extra: object) -> dict:
    """One system's entry of sim_energy.json (``SYSTEM_KEYS`` first, then detail)."""
    return {"goodput_rps": goodput_rps,
            "goodput_per_dollar_hour": goodput_rps / cost_per_hour if cost_per_hour else float("nan"),
            "joules_per_request": e.joules_per_request,
            "joules_per_output_token": e.joules_per_output_token,
            "requests_per_dollar": goodput_rps * 3600.0 / cost_per_hour if cost_per_hour else float("nan"),
            "cost_per_hour": cost_per_hour, **extra,
            "energy_j": e.joules, "busy_j": e.busy_j, "idle_j": e.idle_j, "window_s": e.window_s,
            "completed_requests": e.requests, "output_tokens": e.output_tokens,
            "busy_s_per_instance": list(e.busy_s)}


def pairing_ratios(hma: dict, base: dict) -> dict:
    """``ratio_<key>`` = hma-serve's value / homogeneous H100's, for every key of ``SYSTEM_KEYS``.

    Goodput ratios > 1 favour hma-serve; joule ratios < 1 do (less energy per request / token).
    """
    return {f"ratio_{k}": (hma[k] / base[k] if base[k] else None) for k in SYSTEM_KEYS}


def power_source(devices: tuple[str, ...]) -> str:
    """One line naming each device's busy and idle watts and where they come from."""
    parts = []
    for d in devices:
        p = device_power(d)
        parts.append(f"{d}: busy {p.busy_w:g} W, idle {p.idle_w:g} W ({p.source})")
    return "; ".join(parts) + ". Sources: eval/sim/data/hardware.json (power_w) and eval/sim/data/power.json"


def format_table(out: dict) -> str:
    """The printed table of a sim_energy.json dict (one block per trace)."""
    lines = [f"{'trace':22} {'system':15} {'P:D':>6} {'$/h':>6} {'goodput r/s':>11} {'(r/s)/($/h)':>11} "
             f"{'J/request':>10} {'J/out tok':>9}"]
    for tname, t in out["traces"].items():
        for s in PAIRING:
            x = t[s]
            lines.append(f"{tname:22} {s:15} {x['n_prefill']:>2}:{x['n_decode']:<3} {x['cost_per_hour']:6.2f} "
                         f"{x['goodput_rps']:11.2f} {x['goodput_per_dollar_hour']:11.2f} "
                         f"{x['joules_per_request']:10.1f} {x['joules_per_output_token']:9.3f}")
        lines.append(f"{'':22} {'ratio hma/h100':15} {'':6} {'':6} {t['ratio_goodput_rps']:10.2f}x "
                     f"{t['ratio_goodput_per_dollar_hour']:10.2f}x {t['ratio_joules_per_request']:9.2f}x "
                     f"{t['ratio_joules_per_output_token']:8.2f}x")
        sens = t.get("ratio_joules_per_request_at_idle_fraction", {})
        if sens:
            lines.append(f"{'':22} J/request ratio with idle = " + " / ".join(
                f"{k} x TDP: {v:.2f}x" for k, v in sens.items()))
    p = out["paper"]
    lines.append(f"paper (as RESULTS cites it): up to {p['goodput_ratio']}x goodput, "
                 f"{p['goodput_per_dollar_ratio']}x goodput per dollar; no energy figure")
    return "\n".join(lines)
