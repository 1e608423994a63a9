"""Measure one decoder layer's GEMMs and attention on this machine's GPU, for ``eval.sim gpu-fit``.

Runs on a bare GPU image: torch (+ Triton for the paged decode kernel), no SGLang, no network.

    python -m eval.sim.gpu_measure --out F [--model qwen3-8b] [--quick] [--device cuda|cpu]

What it times (bf16 weights and activations, one layer of ``--model``'s geometry):
    gemm          the layer's four GEMMs (qkv_proj, o_proj, gate_up, down): x[N, in] @ W[in, out]
                  for N in PREFILL_TOKENS (prefill) and DECODE_BATCHES (a decode step's rows)
    attn_prefill  causal SDPA (torch's flash backend on CUDA) over N new tokens, q heads of the
                  model, K/V expanded to the q heads (GQA by repetition; FLOPs are the same)
    attn_decode   one decode step's attention: ``sglang_memha.attention.decode_attention`` over a
                  paged pool (page 16, scattered pages) in each of DECODE_FORMATS, batch B x
                  context C; without CUDA + Triton, torch SDPA over dense K/V (``impl`` says which)
    copy          a device-to-device copy of COPY_BYTES: the measured memory bandwidth
and samples board power with ``nvidia-smi`` (100 ms) while idle (context held), while a prefill
layer loops and while a decode step loops. Without ``nvidia-smi`` ``power`` is null, with the reason.

Output JSON: {"device", "date", "torch", "triton", "model", "copy_gbps", "power",
"rows": [{"kind", "op"?, "tokens"?, "batch"?, "ctx"?, "format"?, "impl"?, "s"}]} where ``s`` is the
median seconds of one call over REPEATS timed loops.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from .config import load_model

PREFILL_TOKENS = (1024, 2048, 4096, 8192)
DECODE_BATCHES = (1, 8, 64)
DECODE_CTX = (1024, 8192, 32768)
DECODE_FORMATS = ("bf16", "fp8_e4m3")
COPY_BYTES = 1 << 30
REPEATS = 5
PAGE = 16


def gemm_ops(m) -> dict[str, tuple[int, int]]:
    """(in, out) of the layer's four GEMMs; the same shapes as ``roofline._gemm_shapes``."""
    h, q, kv, d, i = m.hidden_size, m.num_attention_heads, m.num_key_value_heads, m.head_dim, m.intermediate_size
    return {"qkv_proj": (h, (q + 2 * kv) * d), "o_proj": (q * d, h), "gate_up": (h, 2 * i), "down": (i, h)}


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_call(fn, dev: str, min_s: float = 0.02) -> float:
    """Median seconds of one ``fn()`` call: each of REPEATS loops runs enough calls to last ``min_s``."""
    fn()
    _sync(dev)
    t0 = time.perf_counter()
    fn()
    _sync(dev)
    n = max(1, min(1000, int(min_s / max(time.perf_counter() - t0, 1e-6))))
    per_call = []
    for _ in range(REPEATS):
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync(dev)
        per_call.append((time.perf_counter() - t0) / n)
    return statistics.median(per_call)


class PowerSampler:
    """``with PowerSampler() as p: ...`` then ``p.mean_w``: nvidia-smi's power.draw of GPU 0 every 100 ms."""

    def __init__(self):
        self.proc = None
        self.mean_w = None

    def __enter__(self):
        self.proc = subprocess.Popen(
            ["nvidia-smi", "-i", "0", "--query-gpu=power.draw", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(0.3)  # nvidia-smi's start-up; its first sample is taken before the load
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        vals = [float(x) for x in out.split() if x.replace(".", "", 1).isdigit()]
        self.mean_w = statistics.mean(vals[1:]) if len(vals) > 1 else None
        return False


def _loop_for(fn, dev: str, seconds: float) -> None:
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(10):
            fn()
        _sync(dev)


def _decode_attention_fn(fmt: str, batch: int, ctx: int, m, dev: str, gen, dtype):
    """A zero-argument call of one decode step's attention over ``batch`` x ``ctx`` tokens, and its impl."""
    kvh, d, group = m.num_key_value_heads, m.head_dim, m.num_attention_heads // m.num_key_value_heads
    q = torch.randn(batch, kvh * group, d, device=dev, dtype=dtype, generator=gen)
    if dev == "cuda":
        try:
            from eval.bench_decode_attention import pools
            from sglang_memha.attention.decode import decode_attention
        except ImportError:  # no Triton on this image: fall through to dense SDPA
            pass
        else:
            pages = batch * -(-ctx // PAGE)
            perm = torch.randperm(pages, device=dev, generator=gen)
            slots = (perm[:, None] * PAGE + torch.arange(PAGE, device=dev)).reshape(batch, -1)[:, :ctx]
            indices = slots.reshape(-1).to(torch.int64).contiguous()
            indptr = torch.arange(0, batch + 1, device=dev, dtype=torch.int32) * ctx
            (kd, ks, vd, vs), _ = pools(fmt, pages * PAGE, kvh, d, PAGE, gen)
            return (lambda: decode_attention(fmt, q, kd, ks, vd, vs, indptr, indices, 1 / math.sqrt(d),
                                             max_kv_len=ctx)), "memha_triton"
    if fmt != "bf16":
        return None, None  # the dense fallback has no quantized format
    k = torch.randn(batch, kvh * group, ctx, d, device=dev, dtype=dtype, generator=gen)
    v = torch.randn_like(k)
    return (lambda: F.scaled_dot_product_attention(q[:, :, None, :], k, v)), "sdpa_dense"


def measure(model: str = "qwen3-8b", dev: str = "cuda", quick: bool = False) -> dict:
    """Every row of the module docstring on ``dev``; ``quick`` shrinks the shapes (CPU smoke test)."""
    m = load_model(model)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    gen = torch.Generator(device=dev).manual_seed(0)
    prefill = PREFILL_TOKENS[:2] if quick else PREFILL_TOKENS
    batches, ctxs = (DECODE_BATCHES[:2], DECODE_CTX[:1]) if quick else (DECODE_BATCHES, DECODE_CTX)
    if quick:
        prefill, ctxs = tuple(n // 8 for n in prefill), tuple(c // 8 for c in ctxs)
    rows: list[dict] = []
    weights = {op: torch.randn(k_in, k_out, device=dev, dtype=dtype, generator=gen) * k_in ** -0.5
               for op, (k_in, k_out) in gemm_ops(m).items()}
    for n in (*prefill, *batches):
        for op, w in weights.items():
            x = torch.randn(n, w.shape[0], device=dev, dtype=dtype, generator=gen)
            rows.append({"kind": "gemm", "op": op, "tokens": n, "s": time_call(lambda: x @ w, dev)})
    hq, d = m.num_attention_heads, m.head_dim
    for n in prefill:
        q, k, v = (torch.randn(1, hq, n, d, device=dev, dtype=dtype, generator=gen) for _ in range(3))
        rows.append({"kind": "attn_prefill", "tokens": n,
                     "s": time_call(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), dev)})
    for fmt in DECODE_FORMATS:
        for b in batches:
            for c in ctxs:
                fn, impl = _decode_attention_fn(fmt, b, c, m, dev, gen, dtype)
                if fn is not None:
                    rows.append({"kind": "attn_decode", "format": fmt, "batch": b, "ctx": c, "impl": impl,
                                 "s": time_call(fn, dev)})
                del fn
                if dev == "cuda":
                    torch.cuda.empty_cache()
    nbytes = COPY_BYTES >> (6 if quick else 0)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_s = time_call(lambda: dst.copy_(src), dev)
    rows.append({"kind": "copy", "bytes": nbytes, "s": copy_s})
    return {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": _triton_version(), "model": model, "quick": quick,
            "copy_gbps": 2 * nbytes / copy_s / 1e9,  # read + write
            "power": _power(m, weights, dev, dtype, gen, prefill, quick), "rows": rows}


def _power(m, weights, dev, dtype, gen, prefill, quick) -> dict:
    """Mean board power idle, over a looping prefill layer, and over a looping decode step (W)."""
    if dev != "cuda" or shutil.which("nvidia-smi") is None:
        return {"idle_w": None, "prefill_w": None, "decode_w": None,
                "reason": "no nvidia-smi on this host" if dev == "cuda" else "not a CUDA run"}
    seconds = 1.0 if quick else 3.0
    n = prefill[-2]
    xs = {op: torch.randn(n, w.shape[0], device=dev, dtype=dtype, generator=gen) for op, w in weights.items()}
    q = torch.randn(1, m.num_attention_heads, n, m.head_dim, device=dev, dtype=dtype, generator=gen)
    prefill_layer = lambda: ([xs[op] @ w for op, w in weights.items()],  # noqa: E731
                             F.scaled_dot_product_attention(q, q, q, is_causal=True))
    b, c = DECODE_BATCHES[-1], DECODE_CTX[1]
    attn, _ = _decode_attention_fn("bf16", b, c, m, dev, gen, dtype)
    xd = {op: torch.randn(b, w.shape[0], device=dev, dtype=dtype, generator=gen) for op, w in weights.items()}
    decode_step = lambda: ([xd[op] @ w for op, w in weights.items()], attn())  # noqa: E731
    out = {}
    with PowerSampler() as p:
        time.sleep(seconds)
    out["idle_w"] = p.mean_w
    for name, fn in (("prefill_w", prefill_layer), ("decode_w", decode_step)):
        with PowerSampler() as p:
            _loop_for(fn, dev, seconds)
        out[name] = p.mean_w
    out.update({"prefill_shape": {"tokens": n}, "decode_shape": {"batch": b, "ctx": c, "format": "bf16"},
                "seconds_each": seconds, "source": "nvidia-smi power.draw, GPU 0, every 100 ms"})
    return out


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="shapes / 8, fewer points (a smoke test)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_measure: --device cuda but torch sees no CUDA device; use --device cpu for a smoke run")
    res = measure(a.model, a.device, a.quick)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))
    print(f"{len(res['rows'])} rows -> {a.out}")
    return res


if __name__ == "__main__":
    main()
