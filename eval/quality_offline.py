#!/usr/bin/env python
"""Teacher-forced KV quality of each kvformat codec on SmolLM2-135M (HF transformers, CPU).

Method as /work/shared/reference/real-model/quality_probe.py: for each passage, one fp32 forward
with exact K/V (base) and one per mode in which post-RoPE K and V go through our codec's
quantize -> dequantize (fp32 out) right before attention, so every query sees quantized K/V for
all positions (decode-like worst case). Modes ``<fmt>+had`` apply the Hadamard K rotation
(``transforms.rotate`` before quantize, ``unrotate`` after: equal to rotating q, exact in exact
arithmetic). Texts: pydoc topics and licences shipped with the OS (no download).

    python eval/quality_offline.py [--n 12] [--len 512] [--out eval/results/quality_offline.json]
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
from sglang_memha.kvformat import get_codec  # noqa: E402
from sglang_memha.kvformat.transforms import rotate, unrotate  # noqa: E402

MODES = ("bf16,fp8_e4m3,fp8_e4m3+had,fp8_e4m3fnuz,int8,bfp8,int4_g32,int4_g32+had,int4_g64,int4_g64+had,"
         "int4_g32+had_Konly,int4_g32_Vonly")


def fake_quant(mode: str):
    """mode -> (fk, fv) acting on [B, H_kv, T, D] fp32 tensors (None = untouched)."""
    k_only, v_only = mode.endswith("_Konly"), mode.endswith("_Vonly")
    mode = mode.removesuffix("_Konly").removesuffix("_Vonly")
    fmt, _, tr = mode.partition("+")
    codec = get_codec(fmt)

    def q(x, had):
        b, h, t, d = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(b * t, h, d)  # -> [tokens, kv_heads, head_dim]
        if had:
            rows = rotate(rows)
        y = codec.dequantize(*codec.quantize(rows), torch.float32)
        if had:
            y = unrotate(y)
        return y.reshape(b, t, h, d).permute(0, 2, 1, 3).to(x.dtype)

    fk = None if v_only else (lambda k: q(k, tr == "had"))
    fv = None if k_only else (lambda v: q(v, False))
    return fk, fv


def texts(want: int) -> list[tuple[str, str]]:
    import pydoc_data.topics as t
    keys = sorted(k for k, v in t.topics.items() if len(v) > 4000)
    n_py = want // 2
    step = max(1, len(keys) // n_py)
    out = [("pydoc:" + k, t.topics[k]) for k in keys[::step][:n_py]]
    for n in ["GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "Artistic", "GPL-2", "CC0-1.0"]:
        p = "/usr/share/common-licenses/" + n
        if os.path.exists(p):
            out.append(("license:" + n, open(p).read()))
    return out[:want]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--modes", default=MODES)
    ap.add_argument("--out", default="eval/results/quality_offline.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from sglang_memha.models.smollm2 import ensure_smollm2

    cur = {"fk": None, "fv": None}

    def attn(module, query, key, value, attention_mask, **kw):
        if cur["fk"] is not None:
            key = cur["fk"](key)
        if cur["fv"] is not None:
            value = cur["fv"](value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    ALL_ATTENTION_FUNCTIONS.register("memha_kvq", attn)
    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "memha_kvq"
    passages = []
    for name, txt in texts(args.n):
        ids = tok(txt).input_ids
        if len(ids) >= args.len + 64:
            passages.append((name, torch.tensor(ids[64:64 + args.len])))
    modes = ["base"] + [m for m in args.modes.split(",") if m]
    fns = {m: fake_quant(m) for m in modes[1:]}
    res = {m: {"kl": [], "top1": [], "nll": []} for m in modes}
    t0 = time.time()
    with torch.no_grad():
        for i, (name, ids) in enumerate(passages):
            lp_base = None
            for m in modes:
                cur["fk"], cur["fv"] = fns.get(m, (None, None))
                lp = F.log_softmax(model(ids[None], use_cache=False).logits[0, :-1].float(), -1)
                if m == "base":
                    lp_base = lp
                res[m]["kl"].append((lp_base.exp() * (lp_base - lp)).sum(-1))
                res[m]["top1"].append((lp.argmax(-1) == lp_base.argmax(-1)).float())
                res[m]["nll"].append(-lp.gather(-1, ids[1:, None])[:, 0])
            print(f"[{i + 1}/{len(passages)}] {name} {time.time() - t0:.0f}s", flush=True)
    ppl_base = math.exp(torch.cat(res["base"]["nll"]).mean().item())
    summary = {}
    for m in modes:
        kl, t1 = torch.cat(res[m]["kl"]), torch.cat(res[m]["top1"])
        ppl = math.exp(torch.cat(res[m]["nll"]).mean().item())
        summary[m] = {"mean_kl": kl.mean().item(), "p99_kl": kl.quantile(0.99).item(), "top1_pct": 100 * t1.mean().item(),
                      "ppl": ppl, "dppl_pct": 100 * (ppl / ppl_base - 1)}
    print(f"\n{'mode':22s} {'meanKL':>9s} {'p99KL':>7s} {'top1%':>6s} {'ppl':>7s} {'dppl%':>7s}")
    for m, s in summary.items():
        print(f"{m:22s} {s['mean_kl']:9.2e} {s['p99_kl']:7.4f} {s['top1_pct']:6.2f} {s['ppl']:7.3f} {s['dppl_pct']:+7.2f}")
    flat = {f"dppl_pct_{m}": s["dppl_pct"] for m, s in summary.items()}
    flat.update({f"top1_pct_{m}": s["top1_pct"] for m, s in summary.items()})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({**flat, "ppl_base": ppl_base, "n_passages": len(passages), "len": args.len,
                   "passages": [n for n, _ in passages], "summary": summary,
                   "seconds": time.time() - t0}, fh, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
