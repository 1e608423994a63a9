"""Bad configurations on the quantized-KV path: a clear error to the client and in both logs,
no pages kept on either side, and the next request on a healthy pair fine.

One prefill (int8) serves three decode servers, all with pages of 32: int8 (healthy), int4_kivi
(a format mismatch: its K blocks, 32 tokens each, cannot be converted into or from rows, so it
needs the same format on both sides; int8 -> int4_g64 is re-quantized on send now) and one with
no sglang-memha KV format (the plugin's KV path off there). Requests are aimed at a chosen
decode with ``PDCluster.direct_generate`` (exactly what the router sends), so each case is
deterministic. Free pages are read from each server (``/v1/loads``) after
``/flush_cache``, not assumed.
"""
from __future__ import annotations

import concurrent.futures

import pytest

from sglang_memha.testing import PDCluster, SingleServer
from sglang_memha.testing.cluster import used_tokens
from sglang_memha.testing.procs import ClusterError, http_json
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

PAGE = ["--page-size", "16"]
PROMPT = {"input_ids": list(range(100, 300)), "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                   "ignore_eos": True}}


def assert_ok(resp):
    status, body = resp
    assert status == 200, body
    assert body["meta_info"]["completion_tokens"] == 8


@pytest.fixture(scope="module")
def trio(tiny_model, tmp_path_factory):
    page32 = ["--page-size", "32"]  # int4_kivi's K blocks are 32 tokens
    with PDCluster(tiny_model, page32, page32, env={"MEMHA_KV_FORMAT": "int8"},
                   extra_decode_envs=[{"MEMHA_KV_FORMAT": "int4_kivi"}, {"MEMHA_KV_FORMAT": ""}],
                   log_dir=str(tmp_path_factory.mktemp("trio")), ready="health") as c:
        yield c
    assert descendants() == []


def test_mismatch_and_missing_decode_fail_cleanly(trio):
    assert_ok(trio.direct_generate(PROMPT, decode_index=0))
    servers = [trio.prefill_url, *trio.decode_urls]
    idle = [used_tokens(u) for u in servers]
    assert idle == [0, 0, 0, 0]

    status, body = trio.direct_generate(PROMPT, decode_index=1)
    assert status >= 400
    assert "fmt: local='int4_kivi' peer='int8'" in str(body)

    status, body = trio.direct_generate(PROMPT, decode_index=2)
    assert status >= 400, body  # refused by the prefill: no descriptor in the registration

    assert_ok(trio.direct_generate(PROMPT, decode_index=0))  # the next request is fine
    assert [used_tokens(u) for u in servers] == idle
    logs = trio.logs()
    assert "KV format mismatch with peer" in logs["decode1"]
    assert "KV format mismatch with peer" in logs["prefill"]
    assert "sent no sglang-memha KV format descriptor" in logs["prefill"]


def test_unknown_format_name_stops_start_up(tiny_model, tmp_path):
    with pytest.raises(ClusterError) as err:
        with SingleServer(tiny_model, env={"MEMHA_KV_FORMAT": "fp7"}, log_dir=str(tmp_path)):
            pass
    text = str(err.value) + open(tmp_path / "server.log").read()
    assert "MEMHA_KV_FORMAT" in text and "fp7" in text and "int4_g64" in text  # lists valid names


def test_other_page_size_re_paged_for_a_memha_decode_refused_for_a_stock_one(tiny_model, tmp_path):
    """A prefill with pages of 32 (SGLang's own bf16 pool, described by the plugin) and a
    cluster with pages of 16. Its memha decode (``MEMHA_KV_FORMAT=bf16``) gets the KV re-paged
    32 -> 16: the same tokens as the prefill's own decode with pages of 32. The stock decode
    cannot re-page (no descriptor to exchange): stock SGLang raises in its scheduler and the
    server dies; with the plugin its requests fail with a message naming both page sizes, the
    decode stays up, keeps serving its own prefill, and no pages are kept anywhere."""
    memha_bf16 = {"MEMHA_KV_FORMAT": "bf16"}
    with PDCluster(tiny_model, ["--page-size", "32"], ["--page-size", "32"], decode_env=memha_bf16,
                   log_dir=str(tmp_path), ready="health") as p32:
        with PDCluster(tiny_model, PAGE, PAGE, extra_decode_envs=[memha_bf16],
                       log_dir=str(tmp_path / "p16"), ready="health") as p16:
            own = p32.direct_generate(PROMPT)
            assert_ok(own)
            # the 32-token prefill's requests, aimed at the 16-token cluster's decodes
            body = {**PROMPT, "bootstrap_host": p32.prefill_url.split("//")[1].split(":")[0],
                    "bootstrap_port": p32.bootstrap_port}
            with concurrent.futures.ThreadPoolExecutor(2) as ex:  # what the router does
                both = [ex.submit(http_json, f"{url}/generate", {**body, "bootstrap_room": 4243}, 120)
                        for url in (p32.prefill_url, p16.decode_urls[1])]
                status, resp = both[1].result()
                assert both[0].result()[0] == 200
            assert_ok((status, resp))
            assert resp["output_ids"] == own[1]["output_ids"]
            status, resp = http_json(f"{p16.decode_urls[0]}/generate", {**body, "bootstrap_room": 4242},
                                     timeout=120)
            assert status >= 400, resp
            assert "Page size mismatch" in str(resp) and "--page-size" in str(resp)
            assert "page_size=32" in str(resp) and "page_size=16" in str(resp)
            assert_ok(p16.direct_generate(PROMPT))  # the stock decode is alive and serves its prefill
            servers = [p32.prefill_url, p32.decode_url, *p16.decode_urls, p16.prefill_url]
            assert [used_tokens(u) for u in servers] == [0] * len(servers)
            assert "refused (its requests fail, this server goes on)" in p16.logs()["decode"]
            assert "has page_size=32, this decode 16: it re-pages what it sends" in p16.logs()["decode1"]
        assert "re-paged on send, page_size 32 -> 16" in p32.logs()["prefill"]
