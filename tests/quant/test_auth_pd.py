"""Shared-secret authentication on a real PD deployment (issue 9): one prefill (secret ``k1``)
and three decodes: ``k1`` (same deployment), ``k2`` (another deployment) and none. Requests to
the foreign decodes fail with a message naming the secret, no KV byte is written for them
(the prefill's transfer line shows ``kv_bytes=0``; every pool back to 0 used tokens, read from
the servers), and the next request to the genuine decode completes. Then forged bootstrap rooms
(metadata sent straight to the prefill's ZMQ port) are refused and the genuine request for the
same room is served as if they had never been sent."""
from __future__ import annotations

import json
import re
import time
import urllib.request

import numpy as np
import pytest
import zmq

from sglang_memha.sglang_ext.transfer import handshake

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


def _forge(c, frames_list):
    """Send raw metadata messages to the prefill's bootstrap ZMQ port, as any host could."""
    host = c.prefill_url.split("//")[1].rsplit(":", 1)[0]
    url = (f"http://{host}:{c.bootstrap_port}/route?prefill_dp_rank=0&prefill_cp_rank=0"
           f"&target_tp_rank=0&target_pp_rank=0")
    info = json.load(urllib.request.urlopen(url, timeout=10))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 2000)
    sock.connect(f"tcp://{info['rank_ip']}:{info['rank_port']}")
    for frames in frames_list:
        sock.send_multipart(frames)
    sock.close()
    ctx.term()


def test_forged_bootstrap_rooms_are_refused(tiny_model, tmp_path):
    room = 21
    with PDCluster(tiny_model, PAGE, PAGE, env={"MEMHA_KV_FORMAT": "int8", "MEMHA_SHARED_SECRET": "k1"},
                   log_dir=str(tmp_path), ready="health") as c:
        status, ref = c.direct_generate(PROMPT)  # registers the decode; reference output
        assert status == 200, ref
        session = re.search(r"registered: session (\S+)", c.logs()["prefill"]).group(1)

        def meta(sess, tag=None):
            frames = [str(room).encode(), b"127.0.0.1", b"1", sess.encode(),
                      np.arange(16, dtype=np.int32).tobytes(), b"0", b"", b"1", b"0", b""]
            return frames + ([tag(frames)] if tag else [])

        _forge(c, [[b"21", b"short"],  # malformed: SGLang's parser would end the bootstrap thread
                   meta("127.0.0.1:1"),  # a session that never registered
                   meta(session),  # the genuine session, untagged
                   meta(session, lambda f: handshake.encode_room_tag_frame(f, "k2"))])  # wrong secret
        want = ["malformed KV metadata", "never registered", "without an authentication tag",
                "wrong authentication tag on its KV metadata"]
        deadline = time.monotonic() + 30
        while not all(w in c.logs()["prefill"] for w in want) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert all(w in c.logs()["prefill"] for w in want), [w for w in want if w not in c.logs()["prefill"]]

        status, body = c.direct_generate(PROMPT, room=room)
        assert status == 200 and body["output_ids"] == ref["output_ids"], body
        rows = [r for r in transfer_rows(c.logs()["prefill"]) if r.room == room]
        assert len(rows) == 1 and rows[0].status == "ok" and rows[0].kv_bytes > 0, rows
        assert [used_tokens(u) for u in (c.prefill_url, c.decode_url)] == [0, 0]
    assert descendants() == []
