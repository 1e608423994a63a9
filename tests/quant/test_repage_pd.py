"""A prefill and decodes with other ``--page-size`` values (``Bridge.REPAGE``), on a real CPU PD
deployment (tiny model).

One prefill on SGLang's own bf16 pool (``MEMHA_KV_FORMAT`` unset), pages of 16 tokens and
chunks of 80 (so chunk ends fall inside 32- and 24-token decode pages), serves four decodes at
once: ``fp8_e4m3`` with pages of 16 (reference) and of 32 (converted and re-paged on send),
``bf16`` with pages of 24 (the pool's rows re-paged as they are; 24 is not a multiple of 16) and
a stock decode with pages of 16 (reference for bf16, stock on the wire). Greedy tokens of every
request equal its reference's, Mooncake moved exactly the prompt's rows in the decode's format
(a re-paged send ships tokens, not pages), every pool is idle afterwards, and requests through
the unmodified router get one of the two references' tokens. The address mapping itself is
unit-tested in ``test_repage.py``; 32 -> 16 and the refusal of a decode that cannot re-page are
in ``test_quant_pd_errors.py``.
"""
from __future__ import annotations

import concurrent.futures

import pytest

from sglang_memha.kvformat import kv_bytes_per_token
from sglang_memha.testing import PDCluster
from sglang_memha.testing.cluster import used_tokens
from sglang_memha.testing.procs import http_json
from sglang_memha.testing.transfer_log import transfer_rows
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

H, D, L = 2, 64, 2  # tiny_qwen3 geometry
LENGTHS = [150, 187, 224, 261]
PROMPTS = [{"input_ids": list(range(100 + 7 * i, 100 + 7 * i + n)),
            "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
           for i, n in enumerate(LENGTHS)]
# (name, env, --page-size, wire format)
DECODES = [("fp8_p16", {"MEMHA_KV_FORMAT": "fp8_e4m3"}, "16", "fp8_e4m3"),
           ("fp8_p32", {"MEMHA_KV_FORMAT": "fp8_e4m3"}, "32", "fp8_e4m3"),
           ("bf16_p24", {"MEMHA_KV_FORMAT": "bf16"}, "24", "bf16"),
           ("stock_p16", {"MEMHA_KV_FORMAT": ""}, "16", "stock")]


def ids(resp) -> list[int]:
    status, body = resp
    assert status == 200, body
    assert body["meta_info"]["completion_tokens"] == 8
    return body["output_ids"]


def test_decodes_with_other_page_sizes_get_the_same_tokens(tiny_model, tmp_path):
    with PDCluster(tiny_model, ["--page-size", "16", "--chunked-prefill-size", "80"], ["--page-size", "16"],
                   prefill_env={"MEMHA_KV_FORMAT": ""}, decode_env=DECODES[0][1],
                   extra_decode_envs=[d[1] for d in DECODES[1:]],
                   extra_decode_args=[["--page-size", d[2]] for d in DECODES[1:]],
                   log_dir=str(tmp_path), ready="health") as c:
        jobs = [(d, i) for d in range(len(DECODES)) for i in range(len(PROMPTS))]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            outs = dict(zip(jobs, ex.map(lambda j: ids(c.direct_generate(
                PROMPTS[j[1]], decode_index=j[0], room=1000 + 10 * j[0] + j[1])), jobs)))
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex:
            routed = list(ex.map(lambda p: ids(http_json(f"{c.url}/generate", p, timeout=300)), PROMPTS))
        servers = [c.prefill_url, *c.decode_urls]
        assert [used_tokens(u) for u in servers] == [0] * len(servers)
        logs = c.logs()
    for i in range(len(PROMPTS)):
        assert outs[(1, i)] == outs[(0, i)], i  # fp8, pages of 32 == pages of 16
        assert outs[(2, i)] == outs[(3, i)], i  # bf16 pages of 24 == stock pages of 16
        assert routed[i] in (outs[(0, i)], outs[(3, i)]), i
    rows = {r.room: r for r in transfer_rows(logs["prefill"])}
    for d, (name, _, page, wire) in enumerate(DECODES):
        for i, n in enumerate(LENGTHS):
            r = rows[1000 + 10 * d + i]
            assert (r.fmt, r.status, r.pages) == (wire, "ok", -(-n // 16)), (name, r)
            # a re-paged send moves the prompt's token rows; an unrepaged one whole prefill pages
            tokens = n if page != "16" else -(-n // 16) * 16
            assert r.kv_bytes == tokens * L * kv_bytes_per_token("bf16" if wire == "stock" else wire, H, D), (name, r)
    assert "re-paged on send, page_size 16 -> 32" in logs["prefill"]
    assert "pages converted on send bf16 -> fp8_e4m3; re-paged on send, page_size 16 -> 32" in logs["prefill"]
    assert "re-paged on send, page_size 16 -> 24" in logs["prefill"]
    assert "has page_size=16, this decode 24: it re-pages what it sends" in logs["decode2"]
    assert all("len(chunked_dst_kv_indice)" not in text for text in logs.values())  # SGLang's truncation
    assert descendants() == []
