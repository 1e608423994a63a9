"""CPU demo: the tiny model served by prefill + decode (Mooncake over TCP) + the SGLang router.

Both servers keep their KV in ``--kv-format`` (default ``fp8_e4m3``; ``stock`` = SGLang's own
bf16 pools): the prefill quantizes on write, Mooncake moves the raw quantized rows, the decode
pool keeps them and attention dequantizes what it reads; the prefill ships each layer's pages
while the next layers compute (``MEMHA_PIPELINE=1``; ``--no-pipeline`` sends after the forward,
as stock SGLang does). Prints a few /generate and OpenAI chat
answers through the router, the bytes each request moved, the plugin line of both schedulers,
then shuts everything down by PID. Model: the tiny random Qwen3 (built in seconds); pass
``--model smollm2`` for the real SmolLM2-135M (coherent English). ``--prefill-pool stock``
keeps the prefill on SGLang's own bf16 pool: it then converts the pages it sends into the
decode's format (``MEMHA_ENCODE_ON_SEND``; no per-layer pipelining on that path).
"""
from __future__ import annotations

import argparse
import re
import time

from sglang_memha.testing import PDCluster
from sglang_memha.testing.procs import http_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a Hugging Face folder")
    ap.add_argument("--kv-format", default="fp8_e4m3",
                    help="MEMHA_KV_FORMAT of both servers (bf16, fp8_e4m3, int8, int4_g64, int4_kivi, ...) or 'stock'")
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
    else:
        def get_model(): return args.model
    model = get_model()
    t0 = time.time()
    print(f"starting prefill + decode + router for {model} ...", flush=True)
    page = ["--page-size", "32" if args.kv_format == "int4_kivi" else "16"]  # int4_kivi: 32-token K blocks
    with PDCluster(model, page, page, env=env, prefill_env=prefill_env) as c:
        print(f"ready in {time.time() - t0:.0f}s: router {c.url}, prefill {c.prefill_url}, "
              f"decode {c.decode_url}, logs in {c.log_dir}\n")
        for prompt in ["The capital of France is", "Once upon a time, there was a little"]:
            status, body = c.generate(prompt, max_new_tokens=24)
            print(f"/generate {prompt!r}\n  -> {body['text']!r}" if status == 200 else f"error {status}: {body}")
        status, body = http_json(f"{c.url}/v1/chat/completions",
                                 {"model": "demo", "messages": [{"role": "user", "content": "What is the capital of France?"}],
                                  "max_tokens": 24, "temperature": 0})
        print(f"/v1/chat/completions -> {body['choices'][0]['message']['content']!r}" if status == 200
              else f"error {status}: {body}")
        time.sleep(0.5)  # the prefill logs a transfer when the room concludes
        logs = c.logs()
        for line in re.findall(r"sglang-memha transfer .*", logs["prefill"])[-3:]:
            print(f"prefill: {line}")
        for role, log in logs.items():
            for pattern in (r"sglang-memha KV pool: .*", r"sglang-memha: prefill on SGLang's .*",
                            r"sglang-memha active in scheduler .*"):
                m = re.search(pattern, log)
                if m:
                    print(f"{role}: {m.group(0)}")
    print("stopped every server by PID.")


if __name__ == "__main__":
    main()
