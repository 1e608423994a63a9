"""Different attention TP on prefill and decode, on a real CPU PD deployment through the router
(tiny model: 2 KV heads; fp8_e4m3 with a calibrated K offset; pages of 16).

Two prefills (``--tp-size`` 1 and 2) and two decodes (1 and 2) behind one router (``XPyDCluster``),
so every pairing exists: TP 2 -> 1 (each prefill rank writes its head's rows into the decode's
pages), 1 -> 2 (one prefill rank's rows split over the decode ranks), and the all-TP-1 pair, the
reference, and TP 2 -> 2 (same TP, SGLang's own per-rank send). Each pairing is pinned (the router's
request, sent to chosen servers): greedy tokens equal the reference's, and the prefill's transfer
lines count exactly the heads' rows of the prompt's pages (one line per prefill rank). Requests
through the router get the same tokens whichever pair it picks, and every pool is back to 0 used
tokens afterwards. The bytes themselves, per format, are unit-tested in ``test_head_slice.py``.

A pair that needs head slicing and a send-time bridge (TP 1 -> 2 with another page size) is
refused: the client gets the error naming both TP sizes and the fix, both logs name it, no page
is kept.
"""
from __future__ import annotations

import concurrent.futures

import pytest

from sglang_memha import calibrate
from sglang_memha.kvformat import kv_bytes_per_token
from sglang_memha.testing import PDCluster
from sglang_memha.testing.cluster import used_tokens
from sglang_memha.testing.procs import http_json
from sglang_memha.testing.transfer_log import transfer_rows
from sglang_memha.testing.xpyd import XPyDCluster
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

H, D, L, PAGE = 2, 64, 2, 16  # tiny_qwen3 geometry
LENGTHS = [150, 37, 61]
PROMPTS = [{"input_ids": list(range(100 + 7 * i, 100 + 7 * i + n)),
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
           for i, n in enumerate(LENGTHS)]
# (name, prefill index, decode index): prefill 0 / decode 0 are TP 1, prefill 1 / decode 1 TP 2
PAIRS = [("tp1->tp1", 0, 0), ("tp2->tp1", 1, 0), ("tp1->tp2", 0, 1), ("tp2->tp2", 1, 1)]
TP2 = ["--tp-size", "2"]
# one core per TP rank (SGLang asserts ranks <= NUMA nodes otherwise; this box has one node)
TP2_ENV = {"SGLANG_CPU_OMP_THREADS_BIND": "0|1"}


def ids(resp) -> list[int]:
    status, body = resp
    assert status == 200, body
    assert body["meta_info"]["completion_tokens"] == 12
    return body["output_ids"]


def test_prefill_and_decode_with_other_tp_sizes_get_the_reference_tokens(tiny_model, tmp_path):
    offset = str(tmp_path / "k_offset.safetensors")
    calibrate.main(["--model-path", tiny_model, "--out", offset, "--max-tokens", "1024"])
    env = {"MEMHA_KV_FORMAT": "fp8_e4m3", "MEMHA_K_OFFSET": offset, **TP2_ENV}
    with XPyDCluster(tiny_model, prefill_envs=[{}, {}], decode_envs=[{}, {}], server_args=["--page-size", str(PAGE)],
                     env=env, prefill_args=[[], TP2], decode_args=[[], TP2], log_dir=str(tmp_path / "pd"),
                     ready="health") as c:
        jobs = [(p, i) for p in range(len(PAIRS)) for i in range(len(PROMPTS))]
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as ex:
            outs = dict(zip(jobs, ex.map(lambda j: ids(c.direct_generate(
                PROMPTS[j[1]], prefill_index=PAIRS[j[0]][1], decode_index=PAIRS[j[0]][2],
                room=1000 + 10 * j[0] + j[1])), jobs)))
        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as ex:
            routed = list(ex.map(lambda p: ids(http_json(f"{c.url}/generate", p, timeout=300)), PROMPTS * 2))
        servers = [*c.prefill_urls, *c.decode_urls]
        assert [used_tokens(u) for u in servers] == [0] * len(servers)
        logs = c.logs()
    for p in range(1, len(PAIRS)):
        for i in range(len(PROMPTS)):
            assert outs[(p, i)] == outs[(0, i)], (PAIRS[p][0], i)
    assert routed == [outs[(0, i)] for i in range(len(PROMPTS))] * 2
    # Per room, one transfer line per prefill rank. tp2 -> tp1 and tp2 -> tp2: each rank sends its
    # head of every page to one decode session; tp1 -> tp2: one rank sends one head to each of two
    # decode sessions (pages and bytes summed over the sessions).
    for pair, log, lines, heads, sessions in ((1, "prefill1", 2, 1, 1), (2, "prefill", 1, 2, 2),
                                              (3, "prefill1", 2, 1, 1)):
        rows = transfer_rows(logs[log])
        for i, n in enumerate(LENGTHS):
            pages = -(-n // PAGE)
            mine = [r for r in rows if r.room == 1000 + 10 * pair + i]
            assert [(r.fmt, r.status, r.pages, r.pipelined_pages, r.kv_bytes) for r in mine] == [
                ("fp8_e4m3", "ok", pages * sessions, 0,
                 pages * PAGE * L * kv_bytes_per_token("fp8_e4m3", heads, D))] * lines, (PAIRS[pair][0], i, mine)
    assert "KV heads sliced on send, attention TP 2 -> 1" in logs["prefill1"]
    assert "KV heads sliced on send, attention TP 1 -> 2" in logs["prefill"]
    assert descendants() == []


def test_other_tp_with_another_page_size_is_refused_by_name(tiny_model, tmp_path):
    env = {"MEMHA_KV_FORMAT": "fp8_e4m3", **TP2_ENV}
    with PDCluster(tiny_model, ["--page-size", str(PAGE)], ["--page-size", str(2 * PAGE), *TP2], env=env,
                   log_dir=str(tmp_path / "pd"), ready="health") as c:
        status, body = c.direct_generate(PROMPTS[0])
        servers = [c.prefill_url, c.decode_url]
        assert [used_tokens(u) for u in servers] == [0, 0]
        logs = c.logs()
    why = ("attention TP (head slicing is not combined with the send-time bridge(s) ['repage']: use the same "
           "format and page size on both servers, or the same --tp-size): local=2 peer=1 (local = decode, "
           "peer = prefill)")
    assert status >= 400 and why in str(body), (status, body)
    assert why in logs["decode"] and why in logs["prefill"]
    assert descendants() == []
