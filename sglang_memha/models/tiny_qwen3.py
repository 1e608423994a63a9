"""Build the tiny random Qwen3 used by fast tests: 2 layers, 4 heads, 2 KV heads, head_dim 64.

Why the init std is 0.15, not HF's 0.02: with 0.02 the greedy output is one token repeated,
which would make a PD-vs-single-server token comparison pass even with a broken KV transfer.

Command: ``memha-build-tiny-model [OUT]`` (prints the folder). Deterministic: seed 0, tokenizer
trained on the installed torch's own ``*.py`` files plus a fixed English text.
"""
from __future__ import annotations

import argparse
import glob
import os

from sglang_memha.models import cache_dir

INIT_STD = 0.15
BUILD_VERSION = "1"  # bump when the recipe below changes, so caches rebuild


def default_path() -> str:
    return os.path.join(cache_dir(), f"tiny-qwen3-v{BUILD_VERSION}")


def _train_tokenizer():
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    files = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "*.py")))[:40]
    text = [open(f, encoding="utf-8", errors="ignore").read() for f in files]
    text.append("The quick brown fox jumps over the lazy dog. Hello world! "
                "What is the capital of France? Paris.\n" * 50)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text, trainer=trainer)
    return tok


def build(out: str | None = None, force: bool = False) -> str:
    """Build (or reuse) the tiny model folder and return its path."""
    out = out or default_path()
    if not force and os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    from sglang_memha.models import build_lock

    with build_lock(out):
        if not force and os.path.exists(os.path.join(out, "model.safetensors")):
            return out  # built by another process while this one waited
        return _build(out)


def _build(out: str) -> str:
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    tmp = out + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(), bos_token=None,
                                     eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
    hf_tok.chat_template = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    hf_tok.model_max_length = 4096
    hf_tok.save_pretrained(tmp)
    pad = hf_tok.convert_tokens_to_ids("<|endoftext|>")
    eos = hf_tok.convert_tokens_to_ids("<|im_end|>")
    cfg = Qwen3Config(vocab_size=len(hf_tok), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                      max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
                      initializer_range=INIT_STD, torch_dtype="bfloat16",
                      bos_token_id=pad, eos_token_id=eos, pad_token_id=pad)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(tmp, safe_serialization=True)
    if os.path.exists(out):
        import shutil
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=None, help=f"output folder (default {default_path()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    print(build(args.out, force=args.force))


if __name__ == "__main__":
    main()
