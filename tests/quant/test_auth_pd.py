"""Shared-secret authentication on a real PD deployment (issue 9): one prefill (secret ``k1``)
and three decodes: ``k1`` (same deployment), ``k2`` (another deployment) and none. Requests to
the foreign decodes fail with a message naming the secret, no KV byte is written for them
(the prefill's transfer line shows ``kv_bytes=0``; every pool back to 0 used tokens, read from
the servers), and the next request to the genuine decode completes."""
from __future__ import annotations

import pytest

from sglang_memha.testing import PDCluster
from sglang_memha.testing.cluster import used_tokens
from sglang_memha.testing.transfer_log import transfer_rows
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

PAGE = ["--page-size", "16"]
PROMPT = {"input_ids": list(range(100, 300)), "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                   "ignore_eos": True}}


def test_foreign_decodes_are_refused_before_any_byte_moves(tiny_model, tmp_path):
    with PDCluster(tiny_model, PAGE, PAGE, env={"MEMHA_KV_FORMAT": "int8"},
                   prefill_env={"MEMHA_SHARED_SECRET": "k1"}, decode_env={"MEMHA_SHARED_SECRET": "k1"},
                   extra_decode_envs=[{"MEMHA_SHARED_SECRET": "k2"}, {}],
                   log_dir=str(tmp_path), ready="health") as c:
        status, body = c.direct_generate(PROMPT, decode_index=0)
        assert status == 200, body
        servers = [c.prefill_url, *c.decode_urls]
        assert [used_tokens(u) for u in servers] == [0, 0, 0, 0]

        status, body = c.direct_generate(PROMPT, decode_index=1, room=11)
        assert status >= 400 and "wrong authentication tag" in str(body), body
        status, body = c.direct_generate(PROMPT, decode_index=2, room=12)
        assert status >= 400 and "authenticates with a shared secret" in str(body), body

        status, body = c.direct_generate(PROMPT, decode_index=0)
        assert status == 200 and body["meta_info"]["completion_tokens"] == 8, body
        assert [used_tokens(u) for u in servers] == [0, 0, 0, 0]
        logs = c.logs()
        rows = {r.room: r for r in transfer_rows(logs["prefill"])}
        for room in (11, 12):
            assert room not in rows or rows[room].kv_bytes == 0, rows.get(room)
        assert "wrong authentication tag" in logs["prefill"]
    assert descendants() == []
