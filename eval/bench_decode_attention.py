#!/usr/bin/env python
"""Decode-attention time per format on a CUDA machine: ``sglang_memha.attention.decode_attention``
over one layer's pool, every format in the same run (bf16 is the baseline), with the KV bytes each
call reads and the bandwidth that gives.

    python eval/bench_decode_attention.py [--batch 32] [--kv-len 4096] [--kv-heads 8] [--group 4]
        [--head-dim 128] [--page 16] [--out eval/results/decode_attention_gpu.json]

Slots are scattered (random page order), q is bf16, the split count the launcher's default.
Not yet run on a GPU: no figures recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sglang_memha.attention.decode import DECODE_FORMATS, decode_attention  # noqa: E402
from sglang_memha.kvformat import get_codec, page_geometry  # noqa: E402


def pools(fmt, slots, heads, head_dim, page, gen):
    geo = page_geometry(fmt, page, heads, head_dim)
    codec = get_codec(fmt)
    out = []
    for _ in "kv":
        data = torch.empty(slots, heads, geo.data_bytes_per_head, dtype=torch.uint8, device="cuda")
        scale = torch.empty(slots, heads, geo.scale_bytes_per_head, dtype=torch.uint8, device="cuda") \
            if geo.scale_bytes_per_head else None
        for s0 in range(0, slots, 1 << 16):  # quantize in chunks: bounded temporaries
            n = min(1 << 16, slots - s0)
            x = torch.randn(n, heads, head_dim, device="cuda", generator=gen, dtype=torch.bfloat16)
            codec.quantize_into(x, torch.arange(s0, s0 + n, device="cuda"), data, scale)
        out += [data, scale]
    return out, geo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--kv-len", type=int, default=4096)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(0)
    pages_per_req = -(-a.kv_len // a.page)
    num_pages = a.batch * pages_per_req
    perm = torch.randperm(num_pages, device="cuda", generator=gen)
    slots = (perm[:, None] * a.page + torch.arange(a.page, device="cuda")).reshape(a.batch, -1)[:, :a.kv_len]
    kv_indices = slots.reshape(-1).to(torch.int64).contiguous()
    kv_indptr = torch.arange(0, a.batch + 1, device="cuda", dtype=torch.int32) * a.kv_len
    q = torch.randn(a.batch, a.kv_heads * a.group, a.head_dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows = []
    for fmt in DECODE_FORMATS:
        (kd, ks, vd, vs), geo = pools(fmt, num_pages * a.page, a.kv_heads, a.head_dim, a.page, gen)
        run = lambda: decode_attention(fmt, q, kd, ks, vd, vs, kv_indptr, kv_indices,  # noqa: E731
                                       1 / math.sqrt(a.head_dim), max_kv_len=a.kv_len)
        run()
        ms = triton.testing.do_bench(run, warmup=25, rep=200)
        kv_bytes = 2 * a.batch * a.kv_len * a.kv_heads * (geo.data_bytes_per_head + geo.scale_bytes_per_head)
        rows.append({"format": fmt.value, "us": round(ms * 1e3, 1), "kv_bytes": kv_bytes,
                     "GB_s": round(kv_bytes / ms / 1e6, 1)})
        print(rows[-1], flush=True)
        del kd, ks, vd, vs
    base = rows[0]["us"]
    for r in rows:
        r["time_vs_bf16"] = round(r["us"] / base, 3)
    result = {"device": torch.cuda.get_device_name(), "args": vars(a), "rows": rows}
    print(json.dumps(result, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
