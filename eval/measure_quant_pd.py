"""Measure what the quantized KV path saves on a real CPU PD deployment (issue 4).

For each configuration -- stock SGLang PD (no ``MEMHA_KV_FORMAT``, bf16 pool) and each memha
format on both servers -- one PD cluster of SmolLM2-135M (30 layers, 3 KV heads, head_dim 64)
behind the unmodified router:

* **Wire bytes**: the same prompts (fresh random token ids, ``--prompt-tokens`` each, so no
  radix-cache hit) are sent one at a time; the prefill logs, per request, the bytes Mooncake's
  ``batch_transfer_sync`` reported moved (``sglang-memha transfer ... kv_bytes=... total_bytes=``,
  logged for stock PD too). Ratio = memha bytes / stock bytes, KV pages only and total
  (KV + aux metadata).
* **Decode pool capacity**: the decode server runs without ``--max-total-tokens``; its
  ``/v1/loads`` reports ``memory.token_capacity`` and ``memory.kv_cache_gb`` (the pool's own
  bytes). ``pool_capacity_ratio`` = (tokens per GiB of KV pool, memha) / (same, stock), both read
  from the running decode servers. The raw token counts at the same ``--mem-fraction-static``
  are recorded too, but on CPU SGLang sizes the pool from the memory free while *both* servers
  load their weights, which moves by ~5% between runs; tokens per GiB does not.

Writes ``eval/results/quant_pd.json``. ``python eval/measure_quant_pd.py`` (~5 min).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import time

from sglang_memha.kvformat import FORMAT_VERSION, kv_bytes_per_token
from sglang_memha.models.smollm2 import ensure_smollm2
from sglang_memha.testing import PDCluster
from sglang_memha.testing.procs import http_json
from sglang_memha.testing.transfer_log import transfer_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "eval", "results", "quant_pd.json")
H, D, L = 3, 64, 30  # SmolLM2-135M


def run_config(model: str, fmt: str | None, prompts: list[list[int]], mem_fraction: float,
               log_dir: str, eager: bool = False, on_send: bool = False, page_size: int = 16) -> dict:
    """``on_send``: the prefill keeps SGLang's own bf16 pool and converts on send (decode: ``fmt``)."""
    env = {"MEMHA_KV_FORMAT": fmt} if fmt and not on_send else {}
    decode_env = {"MEMHA_DECODE_DEQUANT": "eager"} if eager else {}
    if on_send:
        decode_env["MEMHA_KV_FORMAT"] = fmt
    common = ["--page-size", str(page_size), "--mem-fraction-static", str(mem_fraction)]  # same for all configs
    with PDCluster(model, common, common, env=env, decode_env=decode_env, max_total_tokens=None,
                   log_dir=log_dir) as c:
        before = len(transfer_rows(c.logs()["prefill"]))
        for ids in prompts:
            status, body = c.generate(input_ids=ids, max_new_tokens=1)
            assert status == 200, body
        time.sleep(0.5)  # the prefill logs the transfer line when the room concludes
        rows = transfer_rows(c.logs()["prefill"])[before:]
        status, loads = http_json(f"{c.decode_url}/v1/loads", timeout=30)
        assert status == 200, loads
    assert len(rows) == len(prompts), f"expected {len(prompts)} transfer lines, got {len(rows)}"
    return {"fmt": fmt or "stock", "kv_bytes": sum(r.kv_bytes for r in rows),
            "total_bytes": sum(r.total_bytes for r in rows), "pages": sum(r.pages for r in rows),
            "decode_max_total_num_tokens": loads["loads"][0]["max_total_num_tokens"],
            "decode_kv_cache_gb": loads["loads"][0]["memory"]["kv_cache_gb"],
            "decode_tokens_per_gib": round(loads["loads"][0]["memory"]["token_capacity"]
                                           / loads["loads"][0]["memory"]["kv_cache_gb"]),
            "bytes_per_token": L * kv_bytes_per_token(fmt or "bf16", H, D) + (L * 2 * H * D * 2 if eager else 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--formats", default="fp8_e4m3,int4_g64,int8,fp8_e4m3:eager",
                    help="comma-separated; FMT:eager = eager-dequant ablation on decode; FMT:onsend = "
                         "prefill on SGLang's bf16 pool, pages converted on send into the decode's FMT")
    ap.add_argument("--out", default=OUT, help="JSON file to write")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1024)
    ap.add_argument("--mem-fraction-static", type=float, default=0.2)
    ap.add_argument("--page-size", type=int, default=16,
                    help="every config, stock included (int4_kivi, int4_kivi_g64: a multiple of 32)")
    args = ap.parse_args()
    model = ensure_smollm2()
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 49000) for _ in range(args.prompt_tokens)] for _ in range(args.prompts)]
    log_root = os.path.join(ROOT, "eval", "logs", "quant_pd")
    runs = {}
    for spec in [None, *args.formats.split(",")]:
        fmt, _, mode = (spec or "").partition(":")
        name = (spec or "stock").replace(":", "_")
        print(f"[{dt.datetime.now():%H:%M:%S}] {name} ...", flush=True)
        runs[name] = run_config(model, fmt or None, prompts, args.mem_fraction_static,
                                os.path.join(log_root, name), eager=mode == "eager", on_send=mode == "onsend",
                                page_size=args.page_size)
        print("   ", runs[name], flush=True)
    stock = runs["stock"]
    out = {"model": "SmolLM2-135M-Instruct", "format_version": FORMAT_VERSION,
           "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
           "page_size": args.page_size,
           "mem_fraction_static": args.mem_fraction_static, "runs": runs,
           "command": "python eval/measure_quant_pd.py " + " ".join(
               f"--{k.replace('_', '-')} {os.path.relpath(v, ROOT) if k == 'out' else v}"
               for k, v in vars(args).items()),
           "date": dt.date.today().isoformat()}
    for name, r in runs.items():
        if name == "stock":
            continue
        key = {"fp8_e4m3": "fp8", "int4_g64": "int4", "fp8_e4m3_eager": "fp8_eager",
               "fp8_e4m3_onsend": "fp8_onsend", "int4_g64_onsend": "int4_onsend"}.get(name, name)
        out[f"wire_bytes_ratio_{key}"] = round(r["total_bytes"] / stock["total_bytes"], 4)
        out[f"wire_kv_bytes_ratio_{key}"] = round(r["kv_bytes"] / stock["kv_bytes"], 4)
        out[f"pool_capacity_ratio_{key}"] = round(r["decode_tokens_per_gib"] / stock["decode_tokens_per_gib"], 4)
        out[f"pool_tokens_at_same_fraction_ratio_{key}"] = round(
            r["decode_max_total_num_tokens"] / stock["decode_max_total_num_tokens"], 4)
        out[f"pool_capacity_ratio_computed_{key}"] = round(stock["bytes_per_token"] / r["bytes_per_token"], 4)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if "ratio" in k}, indent=1))


if __name__ == "__main__":
    main()
