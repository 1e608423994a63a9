"""KV checksum on the wire (issue 9): SGLang's ``--disaggregation-enable-kv-checksum`` working
on CPU and on quantized pools (``sglang_ext.transfer.integrity``). A transfer whose bytes were altered
(one byte flipped on the decode as it arrived, by the test-only plugin ``testing.kv_corruption``) is failed with
"KV checksum mismatch" on arrival, before the request is queued for decoding, its pages are freed, and concurrent
clean requests complete verified."""
from __future__ import annotations

import concurrent.futures
import random
import zlib

import numpy as np
import pytest

from sglang_memha.sglang_ext.transfer.integrity import crc_pages
from sglang_memha.testing import PDCluster
from sglang_memha.testing.cluster import wait_idle
from sglang_memha.testing.kv_corruption import server_env as corrupting_env
from tests.conftest import descendants


def test_crc_pages_is_crc32_of_the_gathered_rows_in_buffer_order():
    rng = np.random.default_rng(1)
    bufs = [rng.integers(0, 256, 10 * item, dtype=np.uint8) for item in (8, 8, 12)]
    items = [8, 8, 12]
    pages = np.array([3, 0, 7])
    expect = b"".join(b.reshape(-1, it)[p].tobytes() for b, it in zip(bufs, items) for p in pages)
    got = crc_pages([b.ctypes.data for b in bufs], items, pages)
    assert got == zlib.crc32(expect) + 1
    bufs[2][7 * 12 + 5] ^= 1  # one bit in the last buffer's last gathered page
    assert crc_pages([b.ctypes.data for b in bufs], items, pages) != got
    assert crc_pages([b.ctypes.data for b in bufs], items, np.array([], dtype=np.int64)) == 1


@pytest.mark.cluster
def test_corrupted_transfer_is_caught_and_others_complete(tiny_model, tmp_path):
    bad_room = random.getrandbits(62)
    flags = ["--page-size", "16", "--disaggregation-enable-kv-checksum"]
    with PDCluster(tiny_model, flags, flags, env={"MEMHA_KV_FORMAT": "int4_g64"},
                   prefill_env={"MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": "0"},
                   decode_env=corrupting_env(str(tmp_path / "plugin"), [bad_room]),
                   log_dir=str(tmp_path), ready="health") as c:
        def run(room):
            body = {"input_ids": [random.randrange(100, 1000) for _ in range(300)],
                    "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}}
            return c.direct_generate(body, room=room)

        rooms = [bad_room] + [random.getrandbits(62) for _ in range(5)]
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            results = list(ex.map(run, rooms))
        status, body = results[0]
        assert status == 500 and "KV checksum mismatch" in str(body), body
        for status, body in results[1:]:
            assert status == 200 and body["meta_info"]["completion_tokens"] == 8, body
        assert wait_idle([c.prefill_url, c.decode_url]) == [0, 0]
        logs = c.logs()
        assert f"corrupted one KV byte of room {bad_room}" in logs["decode"]
        assert logs["decode"].count("KV checksum mismatch req=") == 1
        # caught as the KV arrived, before the request was queued as ready (not at batch entry)
        assert "(detected on arrival, before decoding)" in logs["decode"]
        assert "KV checksum skipped" not in logs["decode"]  # both sides signed the same layout
    assert descendants() == []
