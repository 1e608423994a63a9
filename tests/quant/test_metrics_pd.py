"""memha's figures on a real PD deployment's ``/metrics`` (issue 23, ``sglang_ext/metrics``).

One cluster (page size 16, ``fp8_e4m3``, both servers with ``--enable-metrics`` and the KV
checksum; the prefill pipelined from 64 tokens, the decode with the test-only byte-flipping plugin
for one room) serves requests through the router and one corrupted request; two forged metadata
messages reach the prefill's bootstrap port. Then each server's ``/metrics`` is scraped and compared
with what the servers say elsewhere: the prefill's counters with the sum of its transfer lines
(exactly, bytes and pages; the histogram's count and sum with the lines' ok rows), the decode's
received bytes with the prefill's sent bytes (same page size, no chunk split: exactly), one
checksum failure on the decode, the two refusals on the prefill by reason, the pool gauge with
SGLang's own ``sglang:max_total_num_tokens``, and our series under SGLang's labels, SGLang's own
metrics still served beside ours. One cluster for all of it: every start costs ~35 s here.
"""
from __future__ import annotations

import concurrent.futures as cf
import random
import time
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sglang_memha.testing import PDCluster
from sglang_memha.testing.kv_corruption import server_env as corrupting_env
from sglang_memha.testing.transfer_log import transfer_rows
from tests.conftest import descendants
from tests.quant.test_auth_pd import _forge

pytestmark = pytest.mark.cluster

FMT = "fp8_e4m3"
FLAGS = ["--page-size", "16", "--enable-metrics", "--disaggregation-enable-kv-checksum"]
MIN_TOKENS = 64  # prompts from 64 tokens are pipelined, shorter ones sent whole


def _scrape(url: str) -> list[tuple[str, dict, float]]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def _total(samples, name: str, **labels) -> float:
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def _labels(samples, name: str) -> list[dict]:
    return [lab for n, lab, _ in samples if n == name]


def _generate(c, ids):
    status, body = c.generate(input_ids=ids, max_new_tokens=4, ignore_eos=True)
    assert status == 200, body


def test_metrics_match_the_transfer_lines_on_both_servers(tiny_model, tmp_path):
    rng = random.Random(3)
    bad_room = rng.getrandbits(62)
    with PDCluster(tiny_model, FLAGS, FLAGS, env={"MEMHA_KV_FORMAT": FMT},
                   prefill_env={"MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": str(MIN_TOKENS)},
                   decode_env=corrupting_env(str(tmp_path / "plugin"), [bad_room]),
                   log_dir=str(tmp_path)) as c:  # its readiness check sent one request already
        for n in (5, 150, 600):  # one at a time: no forward cuts a pipelined prompt into chunks
            _generate(c, [rng.randrange(10, 2000) for _ in range(n)])
        shorts = [[rng.randrange(10, 2000) for _ in range(20)] for _ in range(4)]
        with cf.ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda ids: _generate(c, ids), shorts))
        status, body = c.direct_generate({"input_ids": [rng.randrange(10, 2000) for _ in range(100)],
                                          "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}},
                                         room=bad_room)
        assert status == 500 and "KV checksum mismatch" in str(body), body
        meta = [b"21", b"127.0.0.1", b"1", b"127.0.0.1:1", np.arange(4, dtype=np.int32).tobytes(),
                b"0", b"", b"1", b"0", b""]
        _forge(c, [[b"21", b"short"], meta])  # malformed; a session that never registered
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the lines come as rooms conclude; the refusals too
            log = c.logs()["prefill"]
            if len(transfer_rows(log)) >= 9 and "never registered" in log and "malformed KV" in log:
                break
            time.sleep(0.5)
        prefill, decode = _scrape(c.prefill_url), _scrape(c.decode_url)
        rows = transfer_rows(c.logs()["prefill"])
        (tmp_path / "prefill.metrics").write_text("\n".join(map(repr, prefill)))
        (tmp_path / "decode.metrics").write_text("\n".join(map(repr, decode)))

    assert len(rows) >= 9 and {r.fmt for r in rows} == {FMT}, rows
    ok = [r for r in rows if r.status == "ok"]
    # prefill: the sum of its transfer lines, exactly
    assert _total(prefill, "sglang:memha_kv_sent_bytes_total", format=FMT) == sum(r.kv_bytes for r in rows)
    assert _total(prefill, "sglang:memha_kv_sent_pages_total", format=FMT) == sum(r.pages for r in rows)
    piped = sum(r.pipelined_pages for r in rows)
    assert 0 < piped < sum(r.pages for r in rows)  # 150, 600 and 100 tokens pipelined, the rest whole
    assert _total(prefill, "sglang:memha_kv_pipelined_pages_total", format=FMT) == piped
    assert _total(prefill, "sglang:memha_kv_transfer_seconds_count", format=FMT) == len(ok) >= 8
    seconds = _total(prefill, "sglang:memha_kv_transfer_seconds_sum", format=FMT)
    assert abs(seconds - sum(r.transfer_ms for r in ok) / 1e3) <= len(ok) * 0.005e-3 + 1e-9  # lines: %.2f ms
    assert _total(prefill, "sglang:memha_kv_transfer_seconds_bucket", format=FMT, le="+Inf") == len(ok)
    assert _total(prefill, "sglang:memha_handshake_refusals_total", reason="malformed") == 1
    assert _total(prefill, "sglang:memha_handshake_refusals_total", reason="unregistered_session") == 1
    assert _total(prefill, "sglang:memha_kv_received_bytes_total") == 0
    # SGLang's own per-request figure, from the pages it asked to send, says the same (MB = 2^20 B)
    assert _total(prefill, "sglang:kv_transfer_total_mb_sum") * 2**20 == pytest.approx(sum(r.kv_bytes for r in rows))
    # decode: what arrived is what the prefill sent; the flipped byte failed one checksum
    assert _total(decode, "sglang:memha_kv_received_bytes_total", format=FMT) == sum(r.kv_bytes for r in rows)
    assert _total(decode, "sglang:memha_kv_checksum_failures_total") == 1
    assert _total(decode, "sglang:memha_handshake_refusals_total") == 0
    assert _total(decode, "sglang:memha_kv_sent_bytes_total") == 0
    for samples, engine in ((prefill, "prefill"), (decode, "decode")):
        # the pool gauge says what SGLang's own does, with the format; our labels are SGLang's
        sglang_labels = _labels(samples, "sglang:max_total_num_tokens")
        assert len(sglang_labels) == 1 and sglang_labels[0]["engine_type"] == engine, sglang_labels
        assert (_total(samples, "sglang:memha_kv_pool_capacity_tokens", format=FMT)
                == _total(samples, "sglang:max_total_num_tokens") > 0)
        ours = [lab for n, lab, _ in samples if n.startswith("sglang:memha_")]
        extra = {"format", "reason", "le", "from_format", "to_format"}
        assert ours and all({k: v for k, v in lab.items() if k not in extra} == sglang_labels[0] for lab in ours)
        # SGLang's own figures are still served, from its scheduler and its HTTP side
        names = {n for n, _, _ in samples}
        assert {"sglang:scheduler_stage_seconds_total", "sglang:prompt_tokens_total"} <= names, sorted(names)
    assert descendants() == []
