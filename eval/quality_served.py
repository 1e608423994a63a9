#!/usr/bin/env python
"""Quality of the *served* system: a PD cluster per KV format vs a single bf16 SGLang server.

Issue 7 asks, on the real small model served by the PD cluster, per format: top-1 agreement and
the KL divergence of top-k next-token distributions over the generated steps, against a bf16
single server on the same prompts. How (every request through SGLang's HTTP API, nothing
emulated):

1. Per configuration, one PD cluster (prefill + decode + the unmodified router, Mooncake over
   TCP, SmolLM2-135M-Instruct): every prompt generated greedily for ``--steps`` tokens with the
   top-``--k`` logprobs of each step (``output_top_logprobs``). Step 0 is sampled by the prefill
   server, steps >= 1 by the decode server reading the transferred (quantized) KV.
2. The reference, one single bf16 server per page size, scores each generated sequence
   teacher-forced: ``input_ids`` = prompt + generated tokens, ``logprob_start_len`` = prompt
   length - 1 (SGLang's entry 0 is the start token itself, with no logprob),
   ``top_logprobs_num`` 1 (its argmax at every step) and ``token_ids_logprob`` = the served
   top-k ids of that request (its logprobs of exactly those tokens).

So both sides see the same context at every step (the served one's), and no step is dropped
after a divergence, unlike first-divergence statistics (``tests/quant/test_quant_quality.py``).
Per step t, with S_t = the served top-k ids:

* top-1 agreement: served greedy token == the reference's argmax;
* KL_t = sum_{i in S_t} p_i log(p_i / q_i), p = reference, q = served, both renormalized over
  S_t (the "top-k distribution"; exact logprobs on both sides, no floor for missing tokens).

The ``stock_bf16`` row (stock SGLang PD, no plugin format) is the floor: prefill (extend) and
decode kernels round differently from the single server's extend-only scoring, so even bf16 PD
does not agree 100 %. Prompts: ``--n`` slices of ``--len`` tokens of ShareGPT text
(``eval/goodput/prompts.py``). Run: ``.venv/bin/python eval/quality_served.py`` (prints its time
estimate first) -> ``eval/results/quality_served.json``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# name -> (plugin environment, page size). "+had" = the Hadamard K rotation (the recommended fp8 /
# int8 / int4_g64 setting, eval/results/quality_candidates.json); int4_kivi's K blocks are 32 tokens
# (int4_kivi_g64: the same K, V as int4_g64: 0.297 of bf16 instead of 0.3125, issue 22).
CONFIGS = {
    "stock_bf16": ({}, 16),
    "fp8_e4m3": ({"MEMHA_KV_FORMAT": "fp8_e4m3"}, 16),
    "fp8_e4m3+had": ({"MEMHA_KV_FORMAT": "fp8_e4m3", "MEMHA_K_TRANSFORM": "hadamard"}, 16),
    "int8+had": ({"MEMHA_KV_FORMAT": "int8", "MEMHA_K_TRANSFORM": "hadamard"}, 16),
    "int4_g64+had": ({"MEMHA_KV_FORMAT": "int4_g64", "MEMHA_K_TRANSFORM": "hadamard"}, 16),
    "int4_kivi": ({"MEMHA_KV_FORMAT": "int4_kivi"}, 32),
    "int4_kivi_g64": ({"MEMHA_KV_FORMAT": "int4_kivi_g64"}, 32),
}


def topk_kl(ref_logp: dict[int, float], got_logp: dict[int, float]) -> float:
    """KL(p || q) over the token ids of ``got_logp`` (the served top-k), p and q renormalized
    over that set. ref_logp must hold every id of got_logp (KeyError names the missing id)."""
    ids = list(got_logp)
    p = np.array([ref_logp[i] for i in ids], dtype=np.float64)
    q = np.array([got_logp[i] for i in ids], dtype=np.float64)
    p -= np.logaddexp.reduce(p)
    q -= np.logaddexp.reduce(q)
    return float(np.sum(np.exp(p) * (p - q)))


def served_tokens(served: dict) -> list[int]:
    """The generated token ids of a ``meta_info`` with ``output_token_logprobs``."""
    return [tok for _, tok, *_ in served["output_token_logprobs"]]


def step_metrics(served: dict, scored: dict, prompt_last: int) -> tuple[list[bool], list[float]]:
    """Per generated step: (served token == reference argmax, top-k KL).

    served: the PD cluster's ``meta_info`` (``output_token_logprobs`` [(logp, id, text)] per
    step, ``output_top_logprobs`` [[(logp, id, text)] * k] per step). scored: the reference's
    ``meta_info`` for prompt + served tokens with ``logprob_start_len`` = prompt length - 1:
    ``input_token_logprobs`` entry 0 is the prompt's last token (prompt_last; no logprob, and
    None in the other two lists), entry j + 1 is generated step j: ``input_top_logprobs``
    [j + 1][0] the reference's argmax there, ``input_token_ids_logprobs`` [j + 1] its logprobs of
    the requested ids. Raises ValueError when the two do not line up (wrong start, wrong ids).
    """
    gen = served_tokens(served)
    pos_ids = [tok for _, tok, *_ in scored["input_token_logprobs"]]
    if pos_ids[:len(gen) + 1] != [prompt_last, *gen]:
        raise ValueError(f"reference scoring does not line up with the served tokens: positions "
                         f"{pos_ids[:4]} vs prompt end + generated {[prompt_last, *gen][:4]}")
    agree, kls = [], []
    for j, top in enumerate(served["output_top_logprobs"][:len(gen)]):
        ref_top = scored["input_top_logprobs"][j + 1]
        ref_ids = {tok: lp for lp, tok, *_ in scored["input_token_ids_logprobs"][j + 1]}
        agree.append(ref_top[0][1] == gen[j])
        kls.append(topk_kl(ref_ids, {tok: lp for lp, tok, *_ in top}))
    return agree, kls


def summarize(agree: list[bool], kls: list[float]) -> dict:
    a, k = np.asarray(agree, dtype=np.float64), np.asarray(kls)
    return {"top1_agreement": float(a.mean()), "top1_agreement_se": float(a.std() / math.sqrt(len(a))),
            "kl_topk_mean": float(k.mean()), "kl_topk_p99": float(np.percentile(k, 99)),
            "steps": int(len(a))}


def _generate(deploy, prompts: list[list[int]], steps: int, k: int, workers: int) -> list[dict]:
    from sglang_memha.testing.procs import http_json

    def req(ids):
        payload = {"input_ids": ids, "return_logprob": True, "top_logprobs_num": k,
                   "sampling_params": {"max_new_tokens": steps, "temperature": 0, "ignore_eos": True}}
        status, body = http_json(f"{deploy.url}/generate", payload, timeout=600)
        if status != 200:
            raise RuntimeError(f"generate through {deploy.url} failed ({status}): {body}")
        return body["meta_info"]

    with cf.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(req, prompts))


def _score(server, prompt: list[int], served: dict) -> dict:
    from sglang_memha.testing.procs import http_json

    gen = served_tokens(served)
    want = sorted({tok for top in served["output_top_logprobs"] for _, tok, *_ in top})
    payload = {"input_ids": prompt + gen, "return_logprob": True, "logprob_start_len": len(prompt) - 1,
               "top_logprobs_num": 1, "token_ids_logprob": want,
               "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    status, body = http_json(f"{server.url}/generate", payload, timeout=600)
    if status != 200:
        raise RuntimeError(f"reference scoring failed ({status}): {body}")
    return body["meta_info"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"from {', '.join(CONFIGS)}")
    ap.add_argument("--n", type=int, default=24, help="prompts")
    ap.add_argument("--len", type=int, default=384, help="prompt length (tokens)")
    ap.add_argument("--steps", type=int, default=32, help="generated tokens per prompt")
    ap.add_argument("--k", type=int, default=20, help="top-k of the compared distributions")
    ap.add_argument("--workers", type=int, default=24, help="concurrent requests to a PD cluster")
    ap.add_argument("--text", default="auto", choices=("auto", "sharegpt", "os-text"))
    ap.add_argument("--out", default=os.path.join(ROOT, "eval", "results", "quality_served.json"))
    ap.add_argument("--log-dir", default=None)
    a = ap.parse_args(argv)
    configs = a.configs.split(",")
    for c in configs:
        if c not in CONFIGS:
            ap.error(f"--configs: unknown {c!r}; expected some of {', '.join(CONFIGS)}")
    pages = sorted({CONFIGS[c][1] for c in configs})
    est = len(configs) * (75 + a.n * a.len / 250 + a.steps * 0.25) + len(pages) * (40 + a.n * 1.5)
    print(f"quality_served: {len(configs)} PD clusters x {a.n} prompts of {a.len} tokens, {a.steps} steps, "
          f"top-{a.k}; reference servers for page sizes {pages}; estimated ~{est / 60:.0f} min", flush=True)

    from transformers import AutoTokenizer

    from eval.goodput.prompts import build_prompts
    from sglang_memha.models.smollm2 import ensure_smollm2
    from sglang_memha.testing import PDCluster, SingleServer

    model = ensure_smollm2()
    text_source, prompts = build_prompts(AutoTokenizer.from_pretrained(model), [a.len] * a.n, a.text)
    log_dir = a.log_dir or tempfile.mkdtemp(prefix="memha-quality-served-")
    t0 = time.time()
    served: dict[str, list[dict]] = {}
    total = a.n * (a.len + a.steps) + 1024  # every prompt in the pool at once
    for c in configs:
        env, page = CONFIGS[c]
        flags = ["--page-size", str(page)]
        with PDCluster(model, flags, flags, max_total_tokens=total, env=env,
                       log_dir=os.path.join(log_dir, c.replace("+", "_"))) as cluster:
            served[c] = _generate(cluster, prompts, a.steps, a.k, a.workers)
        print(f"  {c}: generated ({time.time() - t0:.0f} s)", flush=True)

    out: dict = {"command": "python eval/quality_served.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "model": os.path.basename(model),
                 "n_prompts": a.n, "prompt_len": a.len, "steps": a.steps, "k": a.k, "text_source": text_source,
                 "configs": configs, "reference": "single SGLang server, bf16, same page size, teacher-forced",
                 "method": "see eval/quality_served.py docstring"}
    for page in pages:
        with SingleServer(model, ["--page-size", str(page)], log_dir=os.path.join(log_dir, f"ref{page}")) as ref:
            for c in (c for c in configs if CONFIGS[c][1] == page):
                agree, kls = [], []
                for p, meta in zip(prompts, served[c]):
                    ag, kl = step_metrics(meta, _score(ref, p, meta), p[-1])
                    agree += ag
                    kls += kl
                s = summarize(agree, kls)
                for key, v in s.items():
                    out[f"served_{key}_{c}"] = v
                print(f"  {c}: top-1 {s['top1_agreement']:.4f} +- {s['top1_agreement_se']:.4f}, "
                      f"KL top-{a.k} mean {s['kl_topk_mean']:.5f} p99 {s['kl_topk_p99']:.4f} "
                      f"over {s['steps']} steps", flush=True)
    out["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
    print(f"wrote {a.out}; {out['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
