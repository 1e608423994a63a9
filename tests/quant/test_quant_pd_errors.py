"""Bad configurations on the quantized-KV path: a clear error to the client and in both logs,
no pages kept on either side, and the next request on a healthy pair fine.

One prefill (int8) serves three decode servers: int8 (healthy), int4_g64 (format mismatch)
and one with no sglang-memha KV format (the plugin's KV path off there). Requests are aimed at
a chosen decode with ``PDCluster.direct_generate`` (exactly what the router sends), so each
case is deterministic. Free pages are read from each server (``/v1/loads``) after
``/flush_cache``, not assumed.
"""
from __future__ import annotations

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
    with PDCluster(tiny_model, PAGE, PAGE, env={"MEMHA_KV_FORMAT": "int8"},
                   extra_decode_envs=[{"MEMHA_KV_FORMAT": "int4_g64"}, {"MEMHA_KV_FORMAT": ""}],
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
    assert "KV format mismatch" in str(body) and "int4_g64" in str(body) and "int8" in str(body)

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


def test_prefill_with_another_page_size_fails_its_requests_not_the_decode(tiny_model, tmp_path):
    """Stock SGLang raises in the decode scheduler when a prefill's page size differs (the decode
    server dies). With the plugin the decode refuses that prefill: its requests fail with
    SGLang's reason, the decode stays up and keeps serving its healthy prefill's requests."""
    with PDCluster(tiny_model, ["--page-size", "32"], PAGE, log_dir=str(tmp_path), ready="health") as bad:
        with PDCluster(tiny_model, PAGE, PAGE, log_dir=str(tmp_path / "good"), ready="health") as good:
            # the bad prefill's request, aimed at the good cluster's decode
            body = {**PROMPT, "bootstrap_host": bad.prefill_url.split("//")[1].split(":")[0],
                    "bootstrap_port": bad.bootstrap_port, "bootstrap_room": 4242}
            status, resp = http_json(f"{good.decode_url}/generate", body, timeout=120)
            assert status >= 400, resp
            assert "Page size mismatch" in str(resp) and "--page-size" in str(resp)
            assert_ok(good.direct_generate(PROMPT))  # the decode is alive and serves its prefill
            assert [used_tokens(u) for u in (good.prefill_url, good.decode_url)] == [0, 0]
            assert "refused (its requests fail, this server goes on)" in good.logs()["decode"]
