"""Prompts of exact token lengths from a token stream."""
import numpy as np
import pytest

from eval.goodput.prompts import cut_prompts, os_texts, token_pool


class WordTokenizer:
    """One token per whitespace-separated word (ids by first appearance)."""

    def __init__(self):
        self.vocab = {}

    def __call__(self, text, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]}


def test_cut_prompts_exact_lengths_disjoint_slices():
    pool = np.arange(100)
    ps = cut_prompts([10, 30, 5], pool)
    assert [len(p) for p in ps] == [10, 30, 5]
    assert ps[0] == list(range(10)) and ps[1] == list(range(10, 40)) and ps[2] == list(range(40, 45))


def test_cut_prompts_wraps_when_the_pool_is_short():
    ps = cut_prompts([4, 4, 4], np.arange(6))
    assert ps == [[0, 1, 2, 3], [4, 5, 0, 1], [2, 3, 4, 5]]
    with pytest.raises(ValueError):
        cut_prompts([0], np.arange(6))
    with pytest.raises(ValueError):
        cut_prompts([1], np.arange(0))


def test_os_text_pool_is_real_text_of_the_size_asked():
    tok = WordTokenizer()
    name, pool = token_pool(tok, 5000, "os-text")
    assert name == "os-text" and len(pool) >= 5000
    assert len(set(pool[:5000].tolist())) > 500  # real text, not one repeated word
    assert any("Python" in t or "License" in t or "LICENSE" in t for t in os_texts()[:400])
    with pytest.raises(ValueError, match="source"):
        token_pool(tok, 10, "web")
