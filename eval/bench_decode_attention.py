#!/usr/bin/env python
"""Decode-attention time per format on a GPU, against our kernel on bf16 pages, torch's flash SDPA
on dense bf16 K/V of the same tokens, and the device's measured copy bandwidth (issue 21).

    python eval/bench_decode_attention.py [--batches 1,8,64] [--ctx 1024,8192,32768] [--kv-heads 8]
        [--group 4] [--head-dim 128] [--page 16] [--out eval/results/decode_attention_gpu.json]
    TRITON_INTERPRET=1 python eval/bench_decode_attention.py --device cpu --quick   # a dry run on CPU

Per (batch B, context C): one set of random bf16 K/V [B * C, kv_heads, head_dim] is written into a
paged pool of every format (``codec.quantize_into``, page ``--page``, pages in random order), and
``sglang_memha.attention.decode_attention`` runs over each (fp8 also with the integer decode,
``hw=False``); the same K/V, dense and contiguous [B, kv_heads, C, head_dim], go to
``F.scaled_dot_product_attention`` (flash backend on CUDA, GQA via ``enable_gqa``). Times are
``triton.testing.do_bench`` medians on CUDA, one timed call on CPU (a dry run: the interpreter's
times mean nothing). Each row states the KV bytes the call reads and their GB/s, and the share
of the copy bandwidth (read + write bytes of a 1 GiB device copy / its time).

Keys (at B = 64, C = 8192; goals in issue 21): ``attn_fp8_vs_bf16_8k`` (fp8 / our bf16, <= 0.6),
``attn_fp8_vs_roofline_8k`` (fp8 time / (KV bytes / copy bandwidth), <= 1.3),
``attn_bf16_vs_sdpa_8k`` (our bf16 / flash SDPA, <= 1.25). Also ``max_abs_diff_bf16_vs_sdpa``:
our kernel on bf16 pages against SDPA on the same values (the bench measures the same attention).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sglang_memha.attention.decode import DECODE_FORMATS, decode_attention  # noqa: E402
from sglang_memha.kvformat import get_codec, page_geometry  # noqa: E402

KEY_SHAPE = (64, 8192)


def pools(fmt, slots, heads, head_dim, page, gen, kv=None, loc=None):
    """K and V pools of ``slots`` slots in ``fmt``: [k_data, k_scale, v_data, v_scale] and the
    page geometry. ``kv``: (K, V) [n, heads, head_dim] bf16, row i written at slot ``loc[i]``;
    without it every slot gets random values."""
    geo = page_geometry(fmt, page, heads, head_dim)
    codec = get_codec(fmt)
    device = gen.device
    if kv is None:
        loc = torch.arange(slots, device=device)
    out = []
    for i in range(2):
        data = torch.empty(slots, heads, geo.data_bytes_per_head, dtype=torch.uint8, device=device)
        scale = torch.empty(slots, heads, geo.scale_bytes_per_head, dtype=torch.uint8, device=device) \
            if geo.scale_bytes_per_head else None
        for s0 in range(0, len(loc), 1 << 16):  # quantize in chunks: bounded temporaries
            at = loc[s0:s0 + (1 << 16)]
            x = torch.randn(len(at), heads, head_dim, device=device, generator=gen, dtype=torch.bfloat16) \
                if kv is None else kv[i][s0:s0 + len(at)]
            codec.quantize_into(x, at, data, scale)
        out += [data, scale]
    return out, geo


def timer(device: str):
    """Seconds of one call of ``fn``: do_bench's median on CUDA, a single call elsewhere."""
    if device == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3

    def once(fn):
        fn()
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return once


def sdpa_fn(q, k, v):
    """Flash SDPA (CUDA) over dense [B, H, C, D] K/V with GQA; the backend it used."""
    q4 = q[:, :, None, :]
    if q.device.type != "cuda":
        return (lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)), "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        def run(b=backend):
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
        try:
            run()
            return run, backend.name.lower()
        except RuntimeError:
            continue
    return (lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)), "math"


def bench_shape(a, batch, ctx, gen, time_of, copy_gbps):
    heads, d, dev = a.kv_heads, a.head_dim, a.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32  # the interpreter's bf16 dot is wrong
    n = batch * ctx
    k, v = (torch.randn(n, heads, d, device=dev, generator=gen, dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(batch, heads * a.group, d, device=dev, generator=gen, dtype=dtype)
    pages = -(-n // a.page)
    perm = torch.randperm(pages, device=dev, generator=gen)  # request tokens land on scattered pages
    slots = (perm[:, None] * a.page + torch.arange(a.page, device=dev)).reshape(-1)[:n]  # token i's slot
    kv_indices = slots.to(torch.int64).contiguous()
    kv_indptr = torch.arange(0, batch + 1, device=dev, dtype=torch.int32) * ctx
    rows, outs = [], {}
    variants = [(f, None) for f in DECODE_FORMATS] + ([("fp8_e4m3", False)] if dev == "cuda" else [])
    for fmt, hw in variants:
        fmt = getattr(fmt, "value", fmt)
        (kd, ks, vd, vs), geo = pools(fmt, pages * a.page, heads, d, a.page, gen, kv=(k, v), loc=kv_indices)
        run = lambda: decode_attention(fmt, q, kd, ks, vd, vs, kv_indptr, kv_indices,  # noqa: E731
                                       1 / math.sqrt(d), max_kv_len=ctx, hw=hw)
        outs[fmt if hw is None else f"{fmt}_int"] = run().float()
        s = time_of(run)
        kv_bytes = 2 * n * heads * (geo.data_bytes_per_head + geo.scale_bytes_per_head)
        rows.append({"batch": batch, "ctx": ctx, "kernel": "memha", "format": fmt + ("" if hw is None else "_int"),
                     "us": round(s * 1e6, 2), "kv_bytes": kv_bytes, "GB_s": round(kv_bytes / s / 1e9, 1),
                     "vs_copy_bw": round(kv_bytes / s / 1e9 / copy_gbps, 3)})
        print(rows[-1], flush=True)
        del kd, ks, vd, vs
    kd4, vd4 = (x.view(batch, ctx, heads, d).transpose(1, 2).contiguous().to(dtype) for x in (k, v))
    run, backend = sdpa_fn(q, kd4, vd4)
    ref = run()[:, :, 0, :].float()
    s = time_of(run)
    kv_bytes = 2 * n * heads * d * kd4.element_size()
    rows.append({"batch": batch, "ctx": ctx, "kernel": f"sdpa_{backend}", "format": "dense " + str(dtype)[6:],
                 "us": round(s * 1e6, 2), "kv_bytes": kv_bytes, "GB_s": round(kv_bytes / s / 1e9, 1),
                 "vs_copy_bw": round(kv_bytes / s / 1e9 / copy_gbps, 3)})
    print(rows[-1], flush=True)
    return rows, float((outs["bf16"] - ref).abs().max())


def copy_bandwidth(dev: str, nbytes: int, time_of) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * nbytes / time_of(lambda: dst.copy_(src)) / 1e9


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--ctx", default="1024,8192,32768")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--quick", action="store_true", help="batches 1,2 x ctx 40,80, 2 KV heads, head_dim 64")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.quick:
        a.batches, a.ctx, a.kv_heads, a.head_dim = "1,2", "40,80", 2, 64
    gen = torch.Generator(device=a.device).manual_seed(0)
    time_of = timer(a.device)
    copy_gbps = copy_bandwidth(a.device, (1 << 30) if a.device == "cuda" else (1 << 24), time_of)
    rows, diffs = [], []
    for b in (int(x) for x in a.batches.split(",")):
        for c in (int(x) for x in a.ctx.split(",")):
            r, diff = bench_shape(a, b, c, gen, time_of, copy_gbps)
            rows += r
            diffs.append(diff)
            if a.device == "cuda":
                torch.cuda.empty_cache()
    result = {"device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu (TRITON_INTERPRET dry run)",
              "args": vars(a), "copy_gbps": round(copy_gbps, 1), "max_abs_diff_bf16_vs_sdpa": max(diffs),
              "rows": rows, **keys(rows, copy_gbps)}
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def keys(rows: list[dict], copy_gbps: float) -> dict:
    """Issue 21's three ratios at KEY_SHAPE, or {} when that shape was not run."""
    at = {(r["kernel"][:4], r["format"]): r for r in rows if (r["batch"], r["ctx"]) == KEY_SHAPE}
    if ("memh", "fp8_e4m3") not in at:
        return {}
    fp8, bf16 = at[("memh", "fp8_e4m3")], at[("memh", "bf16")]
    sdpa = next(r for (k, _), r in at.items() if k == "sdpa")
    return {"attn_fp8_vs_bf16_8k": round(fp8["us"] / bf16["us"], 3),
            "attn_fp8_vs_roofline_8k": round(fp8["us"] * 1e-6 / (fp8["kv_bytes"] / (copy_gbps * 1e9)), 3),
            "attn_bf16_vs_sdpa_8k": round(bf16["us"] / sdpa["us"], 3)}


if __name__ == "__main__":
    main()
