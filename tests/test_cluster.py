"""A real PD deployment on CPU: prefill + decode (Mooncake over TCP) + the unmodified router.

One single server gives the reference greedy tokens, then is stopped (2 cores); one PD cluster
serves every test of this module. Tolerance: exact token ids (greedy, same kernels, bf16).
"""
from __future__ import annotations

import concurrent.futures as cf
import random
import re

import pytest

from sglang_memha.testing import PDCluster, SingleServer
from sglang_memha.testing.procs import http_json
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

PAGE = ["--page-size", "16"]
MAX_NEW = 24


def _prompts(vocab: int = 2000) -> dict[str, list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(10, vocab) for _ in range(40)]
    return {
        "short": [rng.randrange(10, vocab) for _ in range(5)],
        "one_page": [rng.randrange(10, vocab) for _ in range(16)],
        "multi_page": [rng.randrange(10, vocab) for _ in range(150)],
        "long": [rng.randrange(10, vocab) for _ in range(700)],
        "prefix_a": shared + [rng.randrange(10, vocab) for _ in range(7)],
        "prefix_b": shared + [rng.randrange(10, vocab) for _ in range(9)],  # radix-cache hit on prefill
    }


def _ids(status_body) -> list[int]:
    status, body = status_body
    assert status == 200, body
    return body["output_ids"]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    with SingleServer(tiny_model, PAGE, log_dir=str(tmp_path_factory.mktemp("single"))) as s:
        return {k: _ids(s.generate(input_ids=v, max_new_tokens=MAX_NEW, ignore_eos=True))
                for k, v in _prompts().items()}


@pytest.fixture(scope="module")
def cluster(tiny_model, reference, tmp_path_factory):
    with PDCluster(tiny_model, PAGE, PAGE, log_dir=str(tmp_path_factory.mktemp("pd"))) as c:
        yield c
    assert descendants() == []


def test_pd_matches_single_server(cluster, reference):
    got = {k: _ids(cluster.generate(input_ids=v, max_new_tokens=MAX_NEW, ignore_eos=True))
           for k, v in _prompts().items()}
    assert len(set(map(tuple, reference.values()))) > 1, "reference outputs must differ per prompt"
    for k in reference:
        assert len(set(reference[k])) > 3, f"{k}: greedy output is degenerate: {reference[k]}"
        assert got[k] == reference[k], k


def test_32_concurrent_requests_complete(cluster):
    def one(i):
        status, body = cluster.generate(f"Request {i}: a shared prefix for the radix cache",
                                        max_new_tokens=16, ignore_eos=True)
        assert status == 200, body
        return body["meta_info"]["completion_tokens"]

    with cf.ThreadPoolExecutor(16) as ex:
        assert list(ex.map(one, range(32))) == [16] * 32


def test_openai_chat_through_router(cluster):
    status, body = http_json(f"{cluster.url}/v1/chat/completions",
                             {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 8
    assert body["choices"][0]["message"]["role"] == "assistant"


def test_plugin_active_in_both_schedulers(cluster):
    logs = cluster.logs()
    for role in ("prefill", "decode"):
        pat = rf"sglang-memha active in scheduler pid=(\d+) disaggregation_mode={role} cpu_compat=True"
        assert re.search(pat, logs[role]), f"plugin line missing from the {role} log"
