"""xPyD, mixed: two prefills and two decodes of different KV formats and page sizes behind one
unmodified router.

Prefill 0 runs our pool in ``fp8_e4m3fnuz`` (an AMD-style prefill), prefill 1 SGLang's own bf16
pool (``MEMHA_KV_FORMAT`` unset, converting on send), both with pages of 16. Decode 0 keeps
``fp8_e4m3`` (NVIDIA-style) in pages of 16, decode 1 ``int8`` in pages of 32. The router picks
prefill and decode independently, so every pair must work:

    prefill 0 (fnuz) -> decode 0 (fn)    fnuz rows on the wire, converted in place on arrival
    prefill 0 (fnuz) -> decode 1 (int8)  dequantized, re-quantized into int8 and re-paged on send
    prefill 1 (bf16) -> decode 0 / 1     quantized into the decode's format on send (re-paged for 1)

Reference: each pair's own greedy tokens for each prompt, asked of that pair directly
(``direct_generate``, one request at a time, the prefills' radix caches flushed first so every
prefill computes the whole prompt). Requests through the router, sent the same way, must equal
the reference of the pair they went to exactly (tolerance: none; the pair is read from the
prefills' transfer lines: which prefill logged it, and the wire format, which names the decode).
Pairs are not compared with each other beyond the first token, which the prefill computes: on a
random-weight model each format's rounding moves later tokens (quality is measured on SmolLM2 in
``test_quant_quality.py``). Concurrent requests through the router are checked for completion,
bytes and idle pools. The converted bytes themselves are tested byte for byte in-process
(``test_transcode.py``, ``test_repage.py``).

One cluster start serves both tests (tiny model). The second adds a third decode (``int4_g64``,
pages of 16) to the running router through its worker API while requests flow, and removes it
again; only that decode takes int4_g64, so the transfer lines show which requests it served.
The router routes round-robin on both sides so that every server gets requests without relying
on chance (its default, cache_aware, also spreads them, but not on a fixed schedule).
"""
from __future__ import annotations

import concurrent.futures as cf
import random
import threading

import pytest

from sglang_memha.kvformat import kv_bytes_per_token
from sglang_memha.testing.cluster import used_tokens, wait_idle
from sglang_memha.testing.procs import http_json, wait_until
from sglang_memha.testing.transfer_log import transfer_rows
from sglang_memha.testing.xpyd import XPyDCluster
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

PAGE = 16  # both prefills' and decodes 0 and 2's page size; decode 1 uses pages of 32
H, D, L = 2, 64, 2  # tiny_qwen3 geometry
PREFILLS = [{"MEMHA_KV_FORMAT": "fp8_e4m3fnuz"}, {"MEMHA_KV_FORMAT": ""}]
DECODES = [{"MEMHA_KV_FORMAT": "fp8_e4m3"}, {"MEMHA_KV_FORMAT": "int8"}]
DECODE_ARGS = [[], ["--page-size", "32"]]
JOINING = {"MEMHA_KV_FORMAT": "int4_g64"}
# What each prefill's transfer line names for a request to each decode format (the wire format).
WIRE = [{"fp8_e4m3": "fp8_e4m3fnuz", "int8": "int8", "int4_g64": "int4_g64"},
        {"fp8_e4m3": "fp8_e4m3", "int8": "int8", "int4_g64": "int4_g64"}]
REPAGED = {"int8"}  # the wire formats that only the pages-of-32 decode takes
MAX_NEW = 8
_rng = random.Random(5)
PROMPTS = [list(range(100, 400)),  # 300 tokens: 19 pages of 16, 10 of 32 (re-paged: its 300 rows)
           [_rng.randrange(10, 2000) for _ in range(37)], [_rng.randrange(10, 2000) for _ in range(130)]]


def row_bytes(fmt: str) -> int:
    """Bytes of one token's K and V rows over every layer in ``fmt`` (scales included)."""
    return L * kv_bytes_per_token(fmt, H, D)


def payload(input_ids: list[int]) -> dict:
    return {"input_ids": input_ids, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0,
                                                        "ignore_eos": True}}


def ok_ids(resp) -> list[int]:
    status, body = resp
    assert status == 200, body
    assert body["meta_info"]["completion_tokens"] == MAX_NEW, body
    return body["output_ids"]


def rows_by_prefill(c: XPyDCluster) -> list[list]:
    logs = c.logs()
    return [transfer_rows(logs["prefill"]), transfer_rows(logs["prefill1"])]


def wait_rows(c: XPyDCluster, total: int) -> list[list]:
    """The prefills log a request's line when its transfer concludes: wait until ``total`` are in."""
    got: list[list] = []

    def enough():
        got[:] = rows_by_prefill(c)
        return sum(map(len, got)) >= total

    wait_until(enough, 30, c.procs, lambda: f"{total} transfer lines, have {sum(map(len, got))}")
    return got


def check_rows(rows: list[list]) -> None:
    """Every transfer ok, of a wire format that prefill sends, moving exactly its prefill pages'
    rows, or (re-paged) the prompt's rows: more than ``pages - 1`` pages of 16, at most ``pages``."""
    for p, prefill_rows in enumerate(rows):
        for r in prefill_rows:
            assert r.status == "ok" and r.fmt in WIRE[p].values(), (p, r)
            tokens, rest = divmod(r.kv_bytes, row_bytes(r.fmt))
            assert rest == 0, (p, r)
            if r.fmt in REPAGED:
                assert (r.pages - 1) * PAGE < tokens <= r.pages * PAGE, (p, r)
            else:
                assert tokens == r.pages * PAGE, (p, r)


def flush_prefills(c: XPyDCluster) -> None:
    """Empty both prefills' radix caches (refused, so retried, until the last request is gone)."""
    for url in c.prefill_urls:
        wait_until(lambda u=url: http_json(f"{u}/flush_cache", {}, timeout=30)[0] == 200, 30, c.procs,
                   f"{url}/flush_cache")


def one_at_a_time(c: XPyDCluster, send) -> tuple[list[int], int, int, object]:
    """``send()`` with both prefills' caches empty and nothing else in flight; returns its tokens,
    the prefill and decode that served it (from the one transfer line it added) and that line."""
    flush_prefills(c)
    before = [len(r) for r in rows_by_prefill(c)]
    ids = ok_ids(send())
    rows = wait_rows(c, sum(before) + 1)
    grew = [p for p in range(2) if len(rows[p]) > before[p]]
    assert len(grew) == 1 and len(rows[grew[0]]) == before[grew[0]] + 1, (before, rows)
    p = grew[0]
    row = rows[p][-1]
    d = [WIRE[p][e["MEMHA_KV_FORMAT"]] for e in DECODES].index(row.fmt)
    return ids, p, d, row


@pytest.fixture(scope="module")
def xpyd(tiny_model, tmp_path_factory):
    with XPyDCluster(tiny_model, PREFILLS, DECODES, server_args=["--page-size", str(PAGE)], decode_args=DECODE_ARGS,
                     router_args=["--policy", "round_robin"], log_dir=str(tmp_path_factory.mktemp("xpyd"))) as c:
        yield c
    assert descendants() == []


def test_every_pair_and_the_router_give_the_pairs_tokens(xpyd):
    reference: dict[tuple[int, int, int], list[int]] = {}
    for p in range(2):
        for d in range(2):
            for k, prompt in enumerate(PROMPTS):
                ids, got_p, got_d, row = one_at_a_time(xpyd, lambda: xpyd.direct_generate(payload(prompt), p, d))
                assert (got_p, got_d) == (p, d), row
                n, wire = len(prompt), WIRE[p][DECODES[d]["MEMHA_KV_FORMAT"]]
                tokens = n if d == 1 else -(-n // PAGE) * PAGE  # re-paged: the prompt's rows
                assert (row.fmt, row.status, row.pages, row.kv_bytes) == (wire, "ok", -(-n // PAGE),
                                                                           tokens * row_bytes(wire)), (p, d, row)
                reference[p, d, k] = ids
        for k in range(len(PROMPTS)):  # the first token is the prefill's own: the same for both decodes
            assert reference[p, 0, k][0] == reference[p, 1, k][0], (p, k)
    # through the router, one at a time: each equals its pair's reference exactly
    served = set()
    for k in [0, 1, 2] * 2:
        ids, p, d, _ = one_at_a_time(xpyd, lambda: xpyd.generate(input_ids=PROMPTS[k], max_new_tokens=MAX_NEW,
                                                                 ignore_eos=True))
        assert ids == reference[p, d, k], (p, d, k)
        served.add((p, d))
    assert {p for p, _ in served} == {0, 1} and {d for _, d in served} == {0, 1}, served
    # through the router, concurrently: every request completes, one transfer each
    rng = random.Random(7)
    prompts = [[rng.randrange(10, 2000) for _ in range(rng.randrange(20, 200))] for _ in range(8)]
    before = sum(map(len, rows_by_prefill(xpyd)))
    with cf.ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda ids: xpyd.generate(input_ids=ids, max_new_tokens=MAX_NEW, ignore_eos=True),
                           prompts))
    for out in outs:
        ok_ids(out)
    rows = wait_rows(xpyd, before + len(prompts))
    assert sum(map(len, rows)) == before + len(prompts)  # one transfer per request: no retries
    assert [used_tokens(u) for u in (*xpyd.prefill_urls, *xpyd.decode_urls)] == [0, 0, 0, 0]
    check_rows(rows)
    logs = xpyd.logs()
    assert "sglang-memha KV pool: format=fp8_e4m3fnuz " in logs["prefill"]
    assert "prefill on SGLang's bf16 KV pool" in logs["prefill1"]
    assert "sglang-memha KV pool: format=fp8_e4m3 " in logs["decode"]
    assert "sglang-memha KV pool: format=int8 " in logs["decode1"]
    assert ("pages converted on send fp8_e4m3fnuz -> int8 (dequantized and re-quantized: rounded twice); "
            "re-paged on send, page_size 16 -> 32" in logs["prefill"])
    assert "pages converted on send fp8_e4m3fnuz -> fp8_e4m3" not in logs["prefill"]  # the decode bridges
    assert "pages converted on send bf16 -> fp8_e4m3" in logs["prefill1"]
    assert "pages converted on send bf16 -> int8; re-paged on send, page_size 16 -> 32" in logs["prefill1"]


def _loads(url: str) -> int:
    status, body = http_json(f"{url}/v1/loads", timeout=10)
    return sum(x["num_used_tokens"] for x in body["loads"]) if status == 200 else 0


def test_decode_joins_and_leaves_the_running_router_while_requests_flow(xpyd):
    rng = random.Random(11)
    stop, results, lock = threading.Event(), [], threading.Lock()

    def stream(seed: int):
        r = random.Random(seed)
        while not stop.is_set():
            ids = [r.randrange(10, 2000) for _ in range(r.randrange(20, 200))]
            resp = xpyd.generate(input_ids=ids, max_new_tokens=MAX_NEW, ignore_eos=True, timeout=120)
            with lock:
                results.append(resp)

    def int4_rows(per_prefill: bool = False):
        counts = [sum(r.fmt == "int4_g64" for r in rows) for rows in rows_by_prefill(xpyd)]
        return counts if per_prefill else sum(counts)

    before = sum(map(len, rows_by_prefill(xpyd)))
    threads = [threading.Thread(target=stream, args=(rng.random(),), daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        url = xpyd.start_decode(JOINING)  # while requests flow through the two decodes
        worker = xpyd.add_decode(url)
        assert worker and len(worker) == 36, worker  # the router's UUID
        # served from both prefills: fnuz re-quantized into int4_g64, bf16 quantized into it
        wait_until(lambda: all(int4_rows(per_prefill=True)), 90, xpyd.procs,
                   lambda: f"requests from both prefills on the added int4_g64 decode, have {int4_rows(True)}")
        # remove it while it has a request (pages held), so that one must finish after removal
        wait_until(lambda: _loads(url) > 0, 30, xpyd.procs, "a request in flight on the added decode")
        xpyd.remove_decode(url)
        n = len(results)
        wait_until(lambda: len(results) >= n + 6, 60, xpyd.procs, "requests after the removal")
    finally:
        stop.set()
        for t in threads:
            t.join(150)
    for out in results:
        ok_ids(out)  # nothing lost: every request completed, its tokens all there
    wait_rows(xpyd, before + len(results))
    served = int4_rows()
    after = [xpyd.generate(input_ids=list(range(50, 50 + 17 * i)), max_new_tokens=MAX_NEW, ignore_eos=True)
             for i in range(1, 7)]
    for out in after:
        ok_ids(out)
    rows = wait_rows(xpyd, before + len(results) + len(after))
    assert sum(map(len, rows)) == before + len(results) + len(after)  # one transfer per request
    check_rows(rows)
    assert served >= 2 and int4_rows() == served  # routed to while listed, never after
    assert "sglang-memha KV pool: format=int4_g64 " in xpyd.logs()["decode2"]
    assert wait_idle([*xpyd.prefill_urls, *xpyd.decode_urls]) == [0] * 5
