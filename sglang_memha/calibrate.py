"""Calibrate a static K offset for ``MEMHA_K_OFFSET`` (see ``kvformat/k_offset.py``).

    python -m sglang_memha.calibrate --model-path <HF model dir> --out k_offset.safetensors \
        [--text-file FILE ...] [--max-tokens 16384] [--seq-len 512]

Runs the model (HF transformers, CPU or CUDA, the checkpoint's dtype or ``--dtype``) over
calibration text in chunks of ``--seq-len`` tokens and records, per layer and kv head, the mean
of each post-RoPE K channel over every token seen. Text: ``--text-file`` (use text like your
traffic), else Python's own pydoc topics (always installed; English technical prose and code).

The offset only changes what is quantized, never the attention result in exact arithmetic, so a
poor calibration costs quality, not correctness. Channel order is HF's post-RoPE K, which is the
order SGLang's pool sees for neox-style (rotate-half) RoPE models: Llama, Mistral, Qwen2/3,
SmolLM. Takes a few seconds for a 135M model on 2 CPU cores at the defaults.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from sglang_memha.kvformat import k_offset

_ATTN_NAME = "memha_k_calibrate"


def pydoc_texts() -> list[str]:
    import pydoc_data.topics as t

    return [t.topics[k] for k in sorted(t.topics)]


def token_chunks(tokenizer, texts: list[str], seq_len: int, max_tokens: int) -> list[torch.Tensor]:
    """Consecutive ``seq_len``-token chunks of each text (a text's tail shorter than 16 tokens is
    dropped), until ``max_tokens`` tokens."""
    out, total = [], 0
    for txt in texts:
        ids = tokenizer(txt).input_ids
        for s in range(0, len(ids), seq_len):
            chunk = ids[s:s + seq_len][: max_tokens - total]
            if len(chunk) < 16:
                break
            out.append(torch.tensor(chunk))
            total += len(chunk)
            if total >= max_tokens:
                return out
    return out


def k_channel_means(model, chunks: list[torch.Tensor]) -> torch.Tensor:
    """Mean post-RoPE K of ``model`` (an HF causal LM) over ``chunks`` -> [L, H_kv, D] float32.

    Captures K where attention receives it ([B, H_kv, T, D], after RoPE) through a registered
    attention function that then runs SDPA unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    sums: dict[int, torch.Tensor] = {}
    count = 0

    def capture(module, query, key, value, attention_mask, **kw):
        s = key.float().sum(dim=(0, 2))  # [H_kv, D]
        sums[module.layer_idx] = sums.get(module.layer_idx, 0) + s
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    ALL_ATTENTION_FUNCTIONS.register(_ATTN_NAME, capture)
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = _ATTN_NAME
    try:
        with torch.no_grad():
            for ids in chunks:
                model(ids[None].to(model.device), use_cache=False)
                count += ids.numel()
    finally:
        for c, a in zip(configs, saved):
            c._attn_implementation = a
    if not sums or count == 0:
        raise ValueError("calibration saw no tokens: give --text-file with text, or a larger --max-tokens")
    return torch.stack([sums[i] for i in sorted(sums)]).cpu() / count


def calibrate(model_path: str, texts: list[str], seq_len: int = 512, max_tokens: int = 16384,
              dtype: str = "auto", source: str = "") -> tuple[torch.Tensor, str, dict]:
    """-> (offset [L, H_kv, D] float32, model_id, calibration info)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = AutoConfig.from_pretrained(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype, attn_implementation="sdpa").eval()
    chunks = token_chunks(tok, texts, seq_len, max_tokens)
    values = k_channel_means(model, chunks)
    info = {"source": source, "tokens": int(sum(c.numel() for c in chunks)), "seq_len": seq_len,
            "dtype": str(next(model.parameters()).dtype)}
    return values, k_offset.model_id_of(cfg, model_path), info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sglang_memha.calibrate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-path", required=True, help="HF model directory (the one both servers load)")
    ap.add_argument("--out", required=True, help="safetensors file to write (MEMHA_K_OFFSET on both servers)")
    ap.add_argument("--text-file", action="append", default=[], help="calibration text (repeatable); "
                    "default: Python's pydoc topics")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    args = ap.parse_args(argv)
    if args.text_file:
        texts = [open(p, encoding="utf-8", errors="replace").read() for p in args.text_file]
        source = "files: " + ", ".join(args.text_file)
    else:
        texts, source = pydoc_texts(), "pydoc_data.topics"
    t0 = time.time()
    values, mid, info = calibrate(args.model_path, texts, args.seq_len, args.max_tokens, args.dtype, source)
    off = k_offset.save(args.out, values, mid, info)
    print(f"wrote {args.out}: k_offset {list(values.shape)} for {mid}, {info['tokens']} tokens, "
          f"digest {off.digest}, {time.time() - t0:.1f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
