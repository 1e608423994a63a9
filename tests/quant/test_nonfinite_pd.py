"""A model that produces non-finite K for one prompt: that request fails with a reason, the
others of the same batch complete with their normal tokens, and no pages are kept.

The injection is real model arithmetic, not a test hook: a copy of the tiny model whose
embedding row of one token id is NaN (its LM head untied and kept finite, so other prompts'
logits are untouched). Any prompt containing that id gets NaN hidden states, hence NaN K/V
in every layer from its position on.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import shutil

import pytest
import torch

from sglang_memha.testing import PDCluster
from sglang_memha.testing.cluster import used_tokens
from sglang_memha.testing.transfer_log import transfer_rows
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

POISON = 777  # the token id whose embedding is NaN
SAMPLING = {"max_new_tokens": 6, "ignore_eos": True}  # greedy (PDCluster.generate's default)


def poisoned_copy(model_dir: str, out: str) -> str:
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    cfg_path = os.path.join(out, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["tie_word_embeddings"] = False
    json.dump(cfg, open(cfg_path, "w"))
    (st,) = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    weights = load_file(os.path.join(out, st))
    emb = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = emb.clone()
    emb[POISON] = float("nan")
    save_file(weights, os.path.join(out, st), metadata={"format": "pt"})
    return out


def test_nonfinite_kv_fails_only_its_request(tiny_model, tmp_path):
    """One cluster covers both send paths: with ``MEMHA_PIPELINE_MIN_TOKENS=200`` the long bad
    prompt's layers go out during the forward, the short one's whole after it."""
    model = poisoned_copy(tiny_model, str(tmp_path / "model"))
    env = {"MEMHA_KV_FORMAT": "fp8_e4m3", "MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": "200"}
    good = [list(range(100 + i, 400 + i)) for i in range(3)]
    bad_long = list(range(100, 250)) + [POISON] + list(range(250, 400))  # pipelined
    bad_short = list(range(500, 540)) + [POISON] + list(range(540, 600))  # sent whole
    with PDCluster(model, ["--page-size", "16"], ["--page-size", "16"], env=env,
                   decode_env={"MEMHA_KV_FORMAT": "fp8_e4m3"}, log_dir=str(tmp_path / "logs")) as c:
        alone = [c.generate(input_ids=ids, **SAMPLING) for ids in good]
        assert all(s == 200 for s, _ in alone), alone
        with concurrent.futures.ThreadPoolExecutor(5) as pool:  # the bad prompts batched with good ones
            futs = [pool.submit(c.generate, input_ids=ids, **SAMPLING) for ids in [*good, bad_long, bad_short]]
            results = [f.result() for f in futs]
        for (status, body), (_, want) in zip(results[:3], alone):
            assert status == 200, body
            assert body["output_ids"] == want["output_ids"]  # the others are untouched
        for status, body in results[3:]:
            # 400, not SGLang's 500 for a failed transfer: the router neither retries it (each try
            # a new prefill) nor counts it against the workers' circuit breakers
            assert status == 400 and "non-finite K/V" in str(body), (status, body)
        after = [c.generate(input_ids=ids, **SAMPLING) for ids in good]  # still serving
        assert [s for s, _ in after] == [200] * 3, after
        assert [used_tokens(u) for u in (c.prefill_url, c.decode_url)] == [0, 0]
        logs = c.logs()
        assert "non-finite K/V" in logs["prefill"] and "layer(s) [0, 1" in logs["prefill"]
        rows = transfer_rows(logs["prefill"])
        assert any(r.status == "ok" and r.pipelined_pages > 0 for r in rows)  # the pipeline was on
        refused = [r for r in rows if r.status != "ok"]
        # refused before the stock send: no page asked for (the pipelined prompt's layers written
        # during the forward did go out; the decode frees them with the failed request)
        assert len({r.room for r in refused}) == 2 and all(r.pages == 0 for r in refused)  # one try each
    assert descendants() == []
