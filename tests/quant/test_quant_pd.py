"""Quantized KV over Mooncake on a real CPU PD deployment (tiny model, page size 16).

For every format: requests through the unmodified router complete; the bytes Mooncake moved
for a request (logged by the prefill) equal, exactly, its pages x the format's page bytes; the
decode pool holds the format (its log line). ``bf16`` must give the single stock server's
greedy tokens exactly. Quality thresholds of the low-bit formats are measured on SmolLM2
(``test_quant_quality.py``); a random-weight tiny model says little about quality.
"""
from __future__ import annotations

import concurrent.futures as cf
import random

import pytest

from sglang_memha.kvformat import KVFormat, format_spec, kv_bytes_per_token
from sglang_memha.testing import PDCluster, SingleServer
from sglang_memha.testing.transfer_log import transfer_rows
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

PAGE = ["--page-size", "16"]
MAX_NEW = 16
H, D, L = 2, 64, 2  # tiny_qwen3 geometry



def _prompts() -> dict[str, list[int]]:
    rng = random.Random(1)
    return {"short": [rng.randrange(10, 2000) for _ in range(5)],
            "multi_page": [rng.randrange(10, 2000) for _ in range(150)],
            "long": [rng.randrange(10, 2000) for _ in range(600)]}


def _ids(status_body) -> list[int]:
    status, body = status_body
    assert status == 200, body
    return body["output_ids"]


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    with SingleServer(tiny_model, PAGE, log_dir=str(tmp_path_factory.mktemp("single"))) as s:
        return {k: _ids(s.generate(input_ids=v, max_new_tokens=MAX_NEW, ignore_eos=True))
                for k, v in _prompts().items()}


@pytest.mark.parametrize("fmt", [f.value for f in KVFormat])
def test_format_end_to_end(fmt, tiny_model, reference, tmp_path):
    env = {"MEMHA_KV_FORMAT": fmt}
    page = 16 if format_spec(fmt).token_local else 32  # int4_kivi(_g64)'s K blocks are 32 tokens
    args = ["--page-size", str(page)]
    with PDCluster(tiny_model, args, args, env=env, log_dir=str(tmp_path)) as c:
        got = {k: _ids(c.generate(input_ids=v, max_new_tokens=MAX_NEW, ignore_eos=True))
               for k, v in _prompts().items()}
        with cf.ThreadPoolExecutor(8) as ex:  # a few concurrent ones too (batched decode reads)
            lens = list(ex.map(lambda i: len(_ids(c.generate(f"req {i} " * 20, max_new_tokens=8,
                                                             ignore_eos=True))), range(8)))
        logs = c.logs()
    assert lens == [8] * 8
    assert all(len(v) == MAX_NEW for v in got.values())
    if fmt == "bf16":
        assert got == reference
    for side in ("prefill", "decode"):
        assert f"sglang-memha KV pool: format={fmt} " in logs[side]
    rows = transfer_rows(logs["prefill"])
    assert len(rows) >= 3 + 8
    per_page = page * L * kv_bytes_per_token(fmt, H, D)
    for r in rows:
        assert (r.fmt, r.status, r.pipelined_pages) == (fmt, "ok", 0)
        assert r.kv_bytes == r.pages * per_page, r
        assert r.total_bytes > r.kv_bytes  # + the aux metadata row
    # The 600-token prompt moved 600 / page pages, rounded up (38 of 16, 19 of 32).
    assert any(r.pages == -(-600 // page) for r in rows)
    assert descendants() == []


@pytest.mark.parametrize("fmt", ["bf16", "fp8_e4m3"])
def test_eager_dequant_ablation(fmt, tiny_model, reference, tmp_path):
    """MEMHA_DECODE_DEQUANT=eager on decode: same wire bytes, dequantized once on arrival.
    bf16: stock tokens exactly (landing + identity dequant is lossless). fp8: the first steps
    equal deferred mode's (same dequantized prompt KV; eager keeps generated tokens in bf16,
    deferred re-quantizes them, so later steps may drift)."""
    prompts = _prompts()
    modes = ("deferred", "eager")
    outs = {}
    with PDCluster(tiny_model, PAGE, PAGE, env={"MEMHA_KV_FORMAT": fmt}, decode_env={"MEMHA_DECODE_DEQUANT": modes[0]},
                   extra_decode_envs=[{"MEMHA_DECODE_DEQUANT": modes[1]}], log_dir=str(tmp_path)) as c:
        for i, mode in enumerate(modes):  # one prefill feeds both decodes
            outs[mode] = {k: _ids(c.direct_generate({"input_ids": v, "sampling_params": {
                "max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}, decode_index=i))
                for k, v in prompts.items()}
    if fmt == "bf16":
        assert outs["eager"] == reference == outs["deferred"]
    else:
        for k in prompts:
            assert outs["eager"][k][:4] == outs["deferred"][k][:4], k
    assert descendants() == []


def test_fnuz_prefill_feeds_fn_decode(tiny_model, tmp_path):
    """An AMD-style prefill (fp8_e4m3fnuz) feeding an NVIDIA-style decode (fp8_e4m3): the decode
    bridges the arrived rows in place, and the tokens equal an all-fn deployment's."""
    outs = {}
    for pf in ("fp8_e4m3", "fp8_e4m3fnuz"):
        with PDCluster(tiny_model, PAGE, PAGE, prefill_env={"MEMHA_KV_FORMAT": pf},
                       decode_env={"MEMHA_KV_FORMAT": "fp8_e4m3"}, log_dir=str(tmp_path / pf)) as c:
            outs[pf] = {k: _ids(c.generate(input_ids=v, max_new_tokens=MAX_NEW, ignore_eos=True))
                        for k, v in _prompts().items()}
    assert outs["fp8_e4m3fnuz"] == outs["fp8_e4m3"]
    assert descendants() == []
