"""The box's kernel rates at a prompt's own shapes: a prefill model that extrapolates (issue 22).

Why: ``validate.fit_prefill`` solves t(n) = overhead + gemm_flops(n) / F_gemm + attn_flops(n) / F_attn
exactly on three short prompts (256-1024). On this CPU the per-token time of those three is nearly
flat (5.3, 5.3, 5.8 ms), so the quadratic term rests on 0.5 ms of rise, noise included, and the
4K prefill came out 42.4 s against 26.4-29.8 s measured (sim_extrapolation_max_rel_error 0.605).

Here the shape of t(n) comes from kernels timed at each length, not from a polynomial fitted
on short prompts:

* ``measure`` times, in this process, one decoder layer's four GEMMs (``F.linear`` on [n, in] x
  [out, in] weights, the model's shapes) and its causal attention as SGLang's ``torch_native``
  backend runs it for one request (``scaled_dot_product_attention``, q [1, Hq, n, d], k/v
  [1, Hkv, n, d], ``enable_gqa``), in the servers' compute dtype and torch thread count. The
  result is a table: ``lengths`` and, per length, GEMM and attention FLOP/s.
* ``KernelPrefill`` fits two constants on the short prompts of a single-server run, least
  squares on relative error. K(n) = layers x (GEMM + attention kernel seconds at n) + the LM
  head row, at rates interpolated log-log between the measured lengths (a prompt outside them is
  refused, not extrapolated). Two forms of the rest of the forward (SGLang's bookkeeping, norms,
  rope, the KV write, the K/V gathers of ``torch_native``):
    - ``additive`` (the default): t(n) = o + K(n) + c * n, a per-token cost beside the kernels;
    - ``scaled``: t(n) = o + s * K(n), the rest proportional to kernel time.
  Both were tried on issue 22's runs; ``scaled`` first (4K over-predicted by 33-50 %), and
  ``additive`` chosen after seeing that error: RESULTS reports both.
  ``device(n)`` is the simulator's ``Device`` at prompt n: attention at its measured rate / s,
  GEMMs at the rate that gives the GEMM kernels (x s) plus c * n.

Limits: the kernels run alone, without the other server or Mooncake beside them; their rates
moved up to ~10 % between two measurements a minute apart (min of 5 reps each); one request per
prefill batch (the replays of ``extrapolate``).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .config import Device, ModelConfig
from .roofline import _gemm_shapes, prefill_attention_flops

DTYPES = ("float32", "bfloat16")  # torch dtypes the servers compute in (--compute-dtype)


def layer_flops(m: ModelConfig, n: int) -> tuple[float, float]:
    """(GEMM FLOPs, causal attention FLOPs) of ONE layer for one n-token prompt (roofline's counts)."""
    gemm = sum(2.0 * n * a * b for a, b in _gemm_shapes(m))
    return gemm, prefill_attention_flops(m, np.array([n]), np.array([0]))


def _best_of(fn, reps: int) -> float:
    fn()  # warm-up: first-call allocation and oneDNN primitive creation
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def measure(m: ModelConfig, lengths: list[int], dtype: str = "float32", threads: int = 1, reps: int = 3) -> dict:
    """Time one layer's GEMMs and attention at each length (seconds, min of ``reps``) in ``dtype``
    with ``threads`` torch threads; returns the table ``KernelPrefill`` reads. Blocks for the
    whole measurement (about 10 s per 4K length in fp32 on one core)."""
    import torch
    import torch.nn.functional as F

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if sorted(set(lengths)) != list(lengths) or min(lengths) < 1:
        raise ValueError(f"lengths {lengths}: expected increasing positive token counts")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(k_out, k_in, generator=g, dtype=dt) / math.sqrt(k_in) for k_in, k_out in _gemm_shapes(m)]
    rows = []
    try:
        for n in lengths:
            x = {k_in: torch.randn(n, k_in, generator=g, dtype=dt) for k_in, _ in _gemm_shapes(m)}
            t_gemm = _best_of(lambda: [F.linear(x[w.shape[1]], w) for w in weights], reps)
            q = torch.randn(1, m.num_attention_heads, n, m.head_dim, generator=g, dtype=dt)
            k = torch.randn(1, m.num_key_value_heads, n, m.head_dim, generator=g, dtype=dt)
            gqa = m.num_attention_heads != m.num_key_value_heads
            t_attn = _best_of(lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=gqa), reps)
            fg, fa = layer_flops(m, n)
            rows.append({"n": n, "gemm_s": t_gemm, "attn_s": t_attn, "gemm_gflops": fg / t_gemm / 1e9,
                         "attn_gflops": fa / t_attn / 1e9})
    finally:
        torch.set_num_threads(old_threads)
    return {"model": m.name, "dtype": dtype, "threads": threads, "reps": reps, "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "rows": rows}


def load(path: str | Path, m: ModelConfig) -> dict:
    t = json.loads(Path(path).read_text())
    if t.get("model") != m.name:
        raise ValueError(f"{path}: kernel rates of model {t.get('model')!r}, the runs are {m.name!r}: "
                         f"measure again (python -m eval.sim kernel-rates --model {m.name})")
    if len(t.get("rows", [])) < 2:
        raise ValueError(f"{path}: {len(t.get('rows', []))} measured length(s); interpolation needs 2 or more")
    return t


def rate_at(table: dict, key: str, n: int) -> float:
    """FLOP/s of ``key`` (``gemm`` or ``attn``) at ``n`` tokens: log-log interpolation between the
    measured lengths; ValueError outside them (measure the length instead of guessing)."""
    ns = np.array([r["n"] for r in table["rows"]], dtype=np.float64)
    if not ns[0] <= n <= ns[-1]:
        raise ValueError(f"prompt {n} is outside the measured kernel lengths {int(ns[0])}..{int(ns[-1])}: "
                         f"measure it (python -m eval.sim kernel-rates --lengths ...)")
    r = np.array([row[f"{key}_gflops"] for row in table["rows"]], dtype=np.float64) * 1e9
    return float(np.exp(np.interp(np.log(n), np.log(ns), np.log(r))))


FORMS = ("additive", "scaled")


@dataclass(frozen=True)
class KernelPrefill:
    """t(n) = overhead_s + factor * kernel_s(n) + per_token_s * n (``additive``: factor 1;
    ``scaled``: per_token_s 0); ``device(n)`` prices a prefill of n tokens so."""

    model: ModelConfig
    base: Device  # the testbed device; its rates and prefill overhead are replaced per prompt
    table: dict
    overhead_s: float
    factor: float = 1.0
    per_token_s: float = 0.0
    form: str = "additive"

    def _gemm_s(self, n: int) -> tuple[float, float]:
        """(GEMM + LM-head FLOPs, their kernel seconds) of one n-token prompt."""
        fg, _ = layer_flops(self.model, n)
        flops = self.model.num_hidden_layers * fg + 2.0 * self.model.hidden_size * self.model.vocab_size
        return flops, flops / rate_at(self.table, "gemm", n)

    def kernel_s(self, n: int) -> float:
        _, fa = layer_flops(self.model, n)
        return self._gemm_s(n)[1] + self.model.num_hidden_layers * fa / rate_at(self.table, "attn", n)

    def predict_s(self, n: int) -> float:
        return self.overhead_s + self.factor * self.kernel_s(n) + self.per_token_s * n

    def device(self, n: int) -> Device:
        b = self.base  # the simulator multiplies the rates by its efficiencies: divide them out
        flops, gemm_s = self._gemm_s(n)
        gemm_rate = flops / (self.factor * gemm_s + self.per_token_s * n)  # c * n priced as GEMM time
        return replace(b, bf16_tflops=gemm_rate / b.gemm_eff / 1e12,
                       attn_tflops=rate_at(self.table, "attn", n) / self.factor / b.attn_prefill_eff / 1e12,
                       prefill_step_overhead_s=self.overhead_s)

    def as_dict(self) -> dict:
        return {"prefill_model": f"kernel_rates ({self.form})", "prefill_overhead_s": self.overhead_s,
                "kernel_factor": self.factor, "kernel_per_token_s": self.per_token_s,
                "kernel_dtype": self.table["dtype"], "kernel_threads": self.table["threads"],
                "kernel_gemm_gflops": {r["n"]: r["gemm_gflops"] for r in self.table["rows"]},
                "kernel_attn_gflops": {r["n"]: r["attn_gflops"] for r in self.table["rows"]}}


def _fit_once(m: ModelConfig, base: Device, table: dict, form: str, prompts: np.ndarray, kern: np.ndarray,
              y: np.ndarray, w: np.ndarray) -> KernelPrefill:
    """One weighted least-squares fit of ``y`` (seconds) on the prompts' kernel seconds ``kern``."""
    x, target = (prompts, y - kern) if form == "additive" else (kern, y)
    (o, k), *_ = np.linalg.lstsq(np.stack([np.ones_like(x), x], 1) * w[:, None], target * w, rcond=None)
    if o < 0:
        o, k = 0.0, float(np.sum(w * w * x * target) / np.sum((w * x) ** 2))
    if k < 0 or (form == "scaled" and k == 0):
        raise ValueError(f"kernel-rate prefill fit ({form}) is unphysical: {k:.4g} (a per-token cost must be "
                         f">= 0, a factor > 0)")
    if form == "additive":
        return KernelPrefill(m, base, table, float(o), per_token_s=float(k), form=form)
    return KernelPrefill(m, base, table, float(o), factor=float(k), form=form)


def fit(m: ModelConfig, base: Device, table: dict, cal: list[dict], form: str = "additive",
        tb: dict | None = None) -> KernelPrefill:
    """The overhead and, by ``form``, the per-token cost or the factor, by least squares on
    single-server rows ``cal`` (``prompt``, ``ttft_s``), relative error; ValueError if fewer than
    2 rows or the result is unphysical. A negative overhead (noise) is held at 0. With the
    testbed table ``tb`` the fit is on one-request replays (``validate.replay_ttft``), as
    ``validate.fit_prefill``'s: the roofline's elementwise and memory terms, which the closed form
    leaves out, are subtracted from the measurements until the replays match the fit."""
    if form not in FORMS:
        raise ValueError(f"kernel-rate prefill form {form!r}: expected one of {', '.join(FORMS)}")
    if len(cal) < 2:
        raise ValueError(f"{len(cal)} prefill row(s): the overhead and the {form} term need 2 or more")
    prompts = np.array([float(r["prompt"]) for r in cal])
    y = np.array([r["ttft_s"] for r in cal])
    probe = KernelPrefill(m, base, table, 0.0)
    kern = np.array([probe.kernel_s(int(n)) for n in prompts])  # fixed by the table: computed once
    kp = _fit_once(m, base, table, form, prompts, kern, y, 1.0 / y)
    if tb is None:
        return kp
    from .validate import replay_ttft

    for _ in range(50):  # fixed point: the fitted constants stop moving
        extra = np.array([replay_ttft(m, kp.device, "a", int(n), 0.0, tb) - kp.predict_s(int(n)) for n in prompts])
        new = _fit_once(m, base, table, form, prompts, kern, y - extra, 1.0 / y)
        done = np.allclose([new.overhead_s, new.factor, new.per_token_s],
                           [kp.overhead_s, kp.factor, kp.per_token_s], rtol=1e-9, atol=1e-12)
        kp = new
        if done:
            break
    return kp
