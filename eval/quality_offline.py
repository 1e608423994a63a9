#!/usr/bin/env python
"""Teacher-forced KV quality of each kvformat codec on SmolLM2-135M (HF transformers, CPU).

For each passage, one forward with exact K/V (the baseline) and one per mode in which post-RoPE K
and V go through our codec's quantize -> dequantize right before attention, so every query sees
quantized K/V for all positions, itself included (what our torch_native pools do in prefill and
decode). Two settings, both reported:

* ``bf16`` (the issue-7 baseline, "a bf16 server with the same kernels"): model weights and
  compute in bf16; baseline = the same model with its exact bf16 K/V; a mode = the same model
  with the codec's K/V dequantized to bf16, nothing else changed. bf16 compute is chaotic: any
  change to K/V, however small, re-rounds everything downstream, so this setting has a noise
  floor, measured by mode ``noise_ulp`` (every K/V element moved by -1, 0 or +1 bf16 ulp at
  random, an error ~30x smaller than int8's).
* ``fp32`` (fp32-referenced): fp32 compute with the bf16-valued weights; baseline = exact fp32
  K/V, a mode = the codec's K/V dequantized to fp32. Isolates the codec's error.

Modes ``<fmt>+had`` apply the Hadamard K rotation as the product does (``transforms.rotate`` in
fp32 before quantize, dequantize to fp32, ``unrotate``; equal to rotating q; exact in exact
arithmetic). ``_Konly`` / ``_Vonly`` quantize one of K, V. Texts: pydoc topics and licences
shipped with the OS (no download).

Writes ``--out`` (eval/results/quality.json): flat keys ``top1_agreement_<cls>`` /
``ppl_rel_change_<cls>`` (fractions) for the configuration the product recommends for each class
(``RECOMMENDED``), measured in the bf16 setting, the same with ``_fp32ref`` in the fp32 setting,
the noise floor, and the detail per setting and mode.

    python eval/quality_offline.py [--n 24] [--len 512] [--settings bf16,fp32] [--out eval/results/quality.json]
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
from sglang_memha.kvformat import FORMAT_VERSION, get_codec, kv_bytes_per_token  # noqa: E402
from sglang_memha.kvformat.transforms import rotate, unrotate  # noqa: E402

# the configuration each class ships with (MEMHA_KV_FORMAT + MEMHA_K_TRANSFORM)
RECOMMENDED = {"fp8": "fp8_e4m3+had", "int8": "int8+had", "int4": "int4_g64+had"}
MODES = "noise_ulp,bf16,fp8_e4m3,fp8_e4m3+had,int8,int8+had,int4_g32+had,int4_g64,int4_g64+had"


def ulp_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bf16 values moved by -1, 0 or +1 ulp at random (zeros kept): the noise-floor mode."""
    b = x.to(torch.bfloat16)
    step = torch.randint(-1, 2, b.shape, generator=gen).to(torch.int32) * (b != 0).to(torch.int32)
    return (b.view(torch.int16).to(torch.int32) + step).to(torch.int16).view(torch.bfloat16).to(x.dtype)


def fake_quant(mode: str, seed: int = 0):
    """mode -> (fk, fv) acting on [B, H_kv, T, D] tensors in the model's dtype (None = untouched)."""
    if mode == "noise_ulp":
        gen = torch.Generator().manual_seed(seed)
        return (lambda k: ulp_noise(k, gen)), (lambda v: ulp_noise(v, gen))
    k_only, v_only = mode.endswith("_Konly"), mode.endswith("_Vonly")
    mode = mode.removesuffix("_Konly").removesuffix("_Vonly")
    fmt, _, tr = mode.partition("+")
    codec = get_codec(fmt)

    def q(x, had):
        b, h, t, d = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(b * t, h, d)  # -> [tokens, kv_heads, head_dim]
        if had:  # as the pool: rotate in fp32, quantize, dequantize to fp32, unrotate, cast
            y = unrotate(codec.dequantize(*codec.quantize(rotate(rows)), torch.float32)).to(x.dtype)
        else:
            y = codec.dequantize(*codec.quantize(rows), x.dtype)
        return y.reshape(b, t, h, d).permute(0, 2, 1, 3)

    fk = None if v_only else (lambda k: q(k, tr == "had"))
    fv = None if k_only else (lambda v: q(v, False))
    return fk, fv


def texts(want: int) -> list[tuple[str, str]]:
    """Two thirds pydoc topics (spread over the sorted names), one third licences."""
    import pydoc_data.topics as t
    keys = sorted(k for k, v in t.topics.items() if len(v) > 4000)
    licences = [n for n in ["GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "Artistic", "GPL-2",
                            "MPL-1.1", "LGPL-3", "CC0-1.0"] if os.path.exists("/usr/share/common-licenses/" + n)]
    n_lic = min(len(licences), want // 3)
    n_py = min(len(keys), want - n_lic)
    picks = [keys[round(i * len(keys) / n_py)] for i in range(n_py)]
    out = [("pydoc:" + k, t.topics[k]) for k in picks]
    out += [("license:" + n, open("/usr/share/common-licenses/" + n).read()) for n in licences[:n_lic]]
    return out


def load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "memha_kvq"
    return model


def summarize(r: dict, base: dict) -> dict:
    """Pooled over tokens; ``*_se``: standard errors across passages (each passage's mean as one
    sample: tokens of one passage are not independent), ppl's by the delta method."""
    kl, t1, nll = torch.cat(r["kl"]), torch.cat(r["top1"]), torch.cat(r["nll"]).mean().item()
    base_nll = torch.cat(base["nll"]).mean().item()
    d = torch.stack([(a - b).mean() for a, b in zip(r["nll"], base["nll"])])  # per-passage mean delta nll
    t = torch.stack([a.mean() for a in r["top1"]])
    se = (lambda v: (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else None)  # noqa: E731
    return {"mean_kl": kl.mean().item(), "p99_kl": kl.quantile(0.99).item(), "top1_agreement": t1.mean().item(),
            "top1_agreement_se": se(t),
            "ppl": math.exp(nll), "ppl_rel_change": math.exp(nll - base_nll) - 1,
            "ppl_rel_change_se": None if se(d) is None else math.exp(nll - base_nll) * se(d),
            "tokens": t1.numel()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=24, help="passages (>= 20 for issue 7)")
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--settings", default="bf16,fp32")
    ap.add_argument("--modes", default=MODES)
    ap.add_argument("--out", default="eval/results/quality.json")
    args = ap.parse_args()
    from transformers import AutoTokenizer
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
    settings = [s for s in args.settings.split(",") if s]
    models = {s: load_model(path, {"bf16": torch.bfloat16, "fp32": torch.float32}[s]) for s in settings}
    passages = []
    for name, txt in texts(args.n):
        ids = tok(txt).input_ids
        if len(ids) >= args.len + 64:
            passages.append((name, torch.tensor(ids[64:64 + args.len])))
    modes = [m for m in args.modes.split(",") if m]
    res = {s: {m: {"kl": [], "top1": [], "nll": []} for m in ["base"] + modes} for s in settings}
    cross = {"top1": []}  # bf16 baseline vs fp32 baseline (what bf16 compute itself costs)
    t0 = time.time()
    with torch.no_grad():
        for i, (name, ids) in enumerate(passages):
            lp_bases = {}
            for s, model in models.items():
                lp_base = None
                for m in ["base"] + modes:
                    cur["fk"], cur["fv"] = (None, None) if m == "base" else fake_quant(m, seed=i)
                    lp = F.log_softmax(model(ids[None], use_cache=False).logits[0, :-1].float(), -1)
                    if m == "base":
                        lp_base = lp_bases[s] = lp
                    r = res[s][m]
                    r["kl"].append((lp_base.exp() * (lp_base - lp)).sum(-1))
                    r["top1"].append((lp.argmax(-1) == lp_base.argmax(-1)).float())
                    r["nll"].append(-lp.gather(-1, ids[1:, None])[:, 0])
            if "bf16" in lp_bases and "fp32" in lp_bases:
                cross["top1"].append((lp_bases["bf16"].argmax(-1) == lp_bases["fp32"].argmax(-1)).float())
            print(f"[{i + 1}/{len(passages)}] {name} {time.time() - t0:.0f}s", flush=True)
    detail = {}
    for s in settings:
        detail[s] = {m: summarize(r, res[s]["base"]) for m, r in res[s].items()}
    print(f"\n{'setting':8s} {'mode':22s} {'meanKL':>9s} {'p99KL':>7s} {'top1%':>6s} {'ppl':>7s} {'dppl%':>7s} {'+-se':>6s}")
    for s in settings:
        for m, v in detail[s].items():
            se = v["ppl_rel_change_se"] or 0.0
            print(f"{s:8s} {m:22s} {v['mean_kl']:9.2e} {v['p99_kl']:7.4f} {100 * v['top1_agreement']:6.2f} "
                  f"{v['ppl']:7.3f} {100 * v['ppl_rel_change']:+7.3f} {100 * se:6.3f}")
    out = {}
    for cls, mode in RECOMMENDED.items():
        for s, suffix in (("bf16", ""), ("fp32", "_fp32ref")):
            if s in detail and mode in detail[s]:
                out[f"top1_agreement_{cls}{suffix}"] = detail[s][mode]["top1_agreement"]
                out[f"ppl_rel_change_{cls}{suffix}"] = detail[s][mode]["ppl_rel_change"]
                out[f"ppl_rel_change_{cls}{suffix}_se"] = detail[s][mode]["ppl_rel_change_se"]
    if "bf16" in detail and "noise_ulp" in detail["bf16"]:
        out["top1_agreement_noise_floor"] = detail["bf16"]["noise_ulp"]["top1_agreement"]
        out["ppl_rel_change_noise_floor"] = detail["bf16"]["noise_ulp"]["ppl_rel_change"]
    if cross["top1"]:
        out["top1_agreement_bf16_vs_fp32"] = torch.cat(cross["top1"]).mean().item()
    fmt_of = {cls: mode.partition("+")[0] for cls, mode in RECOMMENDED.items()}
    cap = {cls: kv_bytes_per_token("bf16", 3, 64) / kv_bytes_per_token(f, 3, 64) for cls, f in fmt_of.items()}
    out.update({
        "recommended": {cls: {"mode": mode, "MEMHA_KV_FORMAT": fmt_of[cls],
                              "MEMHA_K_TRANSFORM": "hadamard" if "+had" in mode else "none",
                              "capacity_vs_bf16_d64": cap[cls]}
                        for cls, mode in RECOMMENDED.items()},
        "baseline": {
            "bf16": "issue-7 baseline: SmolLM2-135M in bf16 (weights and compute), exact bf16 K/V; modes change "
                    "only K/V (codec quantize -> dequantize to bf16); keys without suffix",
            "fp32": "fp32-referenced: fp32 compute with the bf16-valued weights, exact fp32 K/V; modes dequantize "
                    "to fp32; keys with _fp32ref",
            "noise_floor": "bf16 setting, K/V moved by -1/0/+1 bf16 ulp at random (mode noise_ulp)",
        },
        "method": "teacher-forced; every query sees codec K/V at all positions (itself included); "
                  "top1_agreement = argmax equal to the baseline's; ppl_rel_change = ppl / ppl_base - 1 "
                  "on the passage's next tokens",
        "format_version": FORMAT_VERSION,
        "model": "SmolLM2-135M-Instruct (sglang_memha.models.smollm2)",
        "n_passages": len(passages), "len": args.len, "tokens_per_mode": len(passages) * (args.len - 1),
        "passages": [n for n, _ in passages],
        "detail": detail,
        "seconds": time.time() - t0,
        "command": "python eval/quality_offline.py " + " ".join(sys.argv[1:]),
    })
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
