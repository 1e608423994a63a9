"""Pages converted on send, on a real CPU PD deployment (tiny model, page size 16).

A prefill on SGLang's own bf16 pool (``MEMHA_KV_FORMAT`` unset, the plugin installed) serves
three decodes at once: ``fp8_e4m3``, ``int4_g64`` with the Hadamard K transform, and a stock one.
The memha decodes get their own format on the wire (bytes Mooncake moved = pages x that format's
page bytes, exactly), the stock decode gets stock bf16 pages, and every pool is idle afterwards.
The byte-exactness of the conversion itself is tested in-process (``test_transcode.py``).
"""
from __future__ import annotations

import pytest

from sglang_memha.kvformat import kv_bytes_per_token
from sglang_memha.testing import PDCluster
from sglang_memha.testing.cluster import used_tokens
from sglang_memha.testing.transfer_log import transfer_rows
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

PAGE = ["--page-size", "16"]
H, D, L = 2, 64, 2  # tiny_qwen3 geometry
PROMPT = {"input_ids": list(range(100, 400)), "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                   "ignore_eos": True}}
PAGES = 19  # 300 prompt tokens / 16


def ok_ids(resp) -> list[int]:
    status, body = resp
    assert status == 200, body
    assert body["meta_info"]["completion_tokens"] == 8
    return body["output_ids"]


def test_stock_bf16_prefill_feeds_memha_and_stock_decodes(tiny_model, tmp_path):
    decodes = [("fp8_e4m3", {"MEMHA_KV_FORMAT": "fp8_e4m3"}),
               ("int4_g64", {"MEMHA_KV_FORMAT": "int4_g64", "MEMHA_K_TRANSFORM": "hadamard"}),
               ("stock", {"MEMHA_KV_FORMAT": ""})]
    with PDCluster(tiny_model, PAGE, PAGE, decode_env=decodes[0][1],
                   extra_decode_envs=[e for _, e in decodes[1:]], log_dir=str(tmp_path), ready="health") as c:
        outs = {name: ok_ids(c.direct_generate(PROMPT, decode_index=i, room=1000 + i))
                for i, (name, _) in enumerate(decodes)}
        servers = [c.prefill_url, *c.decode_urls]
        assert [used_tokens(u) for u in servers] == [0] * len(servers)
        logs = c.logs()
    # The first token comes from the prefill's own bf16 forward: the same whoever decodes.
    assert outs["fp8_e4m3"][0] == outs["int4_g64"][0] == outs["stock"][0]
    rows = {r.room: r for r in transfer_rows(logs["prefill"])}
    for i, (name, _) in enumerate(decodes):
        r = rows[1000 + i]
        wire = "bf16" if name == "stock" else name
        assert (r.fmt, r.status, r.pages) == (name, "ok", PAGES), r
        assert r.kv_bytes == PAGES * 16 * L * kv_bytes_per_token(wire, H, D), r
    assert "pages converted on send bf16 -> fp8_e4m3" in logs["prefill"]
    assert "pages converted on send bf16 -> int4_g64" in logs["prefill"]
    assert "prefill on SGLang's bf16 KV pool" in logs["prefill"]
    assert "sglang-memha KV pool: format=int4_g64 k_transform=hadamard" in logs["decode1"]
    assert descendants() == []


def test_layer_scale_prefill_feeds_per_token_decode(tiny_model, tmp_path):
    """SGLang's fp8 pool bytes (our byte-compatible ``fp8_e4m3_tensor`` pool: SGLang's own refuses
    this CPU) into an ``fp8_e4m3`` decode: data bytes kept, per-row scales added on send."""
    with PDCluster(tiny_model, PAGE, PAGE, prefill_env={"MEMHA_KV_FORMAT": "fp8_e4m3_tensor"},
                   decode_env={"MEMHA_KV_FORMAT": "fp8_e4m3"}, log_dir=str(tmp_path), ready="health") as c:
        ok_ids(c.direct_generate(PROMPT, room=77))
        assert [used_tokens(u) for u in (c.prefill_url, c.decode_url)] == [0, 0]
        logs = c.logs()
    r = {r.room: r for r in transfer_rows(logs["prefill"])}[77]
    assert (r.fmt, r.status, r.pages) == ("fp8_e4m3", "ok", PAGES)
    assert r.kv_bytes == PAGES * 16 * L * kv_bytes_per_token("fp8_e4m3", H, D)
    assert "pages converted on send fp8_e4m3_tensor -> fp8_e4m3" in logs["prefill"]


def test_prefill_that_publishes_no_descriptor_is_refused(tiny_model, tmp_path):
    """``MEMHA_ENCODE_ON_SEND=0``: the prefill behaves as one without the plugin (it publishes no
    format); the memha decode refuses it with a message, nothing is kept on either side."""
    with PDCluster(tiny_model, PAGE, PAGE, prefill_env={"MEMHA_ENCODE_ON_SEND": "0"},
                   decode_env={"MEMHA_KV_FORMAT": "fp8_e4m3"}, log_dir=str(tmp_path), ready="health") as c:
        status, body = c.direct_generate(PROMPT)
        assert status >= 400, body
        assert "sent no sglang-memha KV format descriptor" in str(body)
        assert "MEMHA_KV_FORMAT" in str(body)
        assert [used_tokens(u) for u in (c.prefill_url, c.decode_url)] == [0, 0]
        assert "sent no sglang-memha KV format descriptor" in c.logs()["decode"]
