"""MEMHA_K_OFFSET on a real CPU PD deployment (tiny model, fp8_e4m3, pages of 16, the router).

One prefill (fp8 + a calibrated offset) and two decodes: one with the same offset file, one
without. References: a single server with the same pool settings (MEMHA_KV_FORMAT + the offset:
the same quantized K/V on both phases, so greedy tokens must be equal), exact wire bytes (the
offset adds none), and for the decode without the offset a refusal naming the field and the fix
while the healthy pair keeps serving and no pages stay taken.
"""
from __future__ import annotations

import pytest

from sglang_memha import calibrate
from sglang_memha.kvformat import k_offset, kv_bytes_per_token
from sglang_memha.testing import PDCluster, SingleServer
from sglang_memha.testing.cluster import used_tokens
from sglang_memha.testing.procs import ClusterError
from sglang_memha.testing.transfer_log import transfer_rows
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

PAGE = ["--page-size", "16"]
H, D, L = 2, 64, 2  # tiny_qwen3 geometry
PROMPTS = [list(range(100, 300)), list(range(700, 737)), [5, 9, 13] * 50]


def _payload(ids):
    return {"input_ids": ids, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}


@pytest.fixture(scope="module")
def offset_file(tiny_model, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("koff") / "k_offset.safetensors")
    calibrate.main(["--model-path", tiny_model, "--out", out, "--max-tokens", "1024"])
    return out


def test_offset_pd_equals_single_server_and_refuses_a_decode_without_it(tiny_model, offset_file, tmp_path):
    env = {"MEMHA_KV_FORMAT": "fp8_e4m3", "MEMHA_K_OFFSET": offset_file}
    digest = k_offset.load(offset_file).digest
    with SingleServer(tiny_model, PAGE, env=env, log_dir=str(tmp_path / "single")) as s:
        want = [s.generate(input_ids=p, max_new_tokens=12, ignore_eos=True)[1]["output_ids"] for p in PROMPTS]
    with PDCluster(tiny_model, PAGE, PAGE, env=env, extra_decode_envs=[{"MEMHA_K_OFFSET": ""}],
                   log_dir=str(tmp_path / "pd"), ready="health") as c:
        got = []
        for p in PROMPTS:
            status, body = c.direct_generate(_payload(p), decode_index=0)
            assert status == 200, body
            got.append(body["output_ids"])
        status, body = c.direct_generate(_payload(PROMPTS[0]), decode_index=1)
        assert status >= 400, body
        assert "k_offset" in str(body) and "MEMHA_K_OFFSET to the same calibration file" in str(body)
        assert c.direct_generate(_payload(PROMPTS[1]), decode_index=0)[0] == 200  # the pair goes on
        servers = [c.prefill_url, *c.decode_urls]
        assert [used_tokens(u) for u in servers] == [0] * len(servers)
        logs = c.logs()
    assert got == want
    assert f"k_offset={digest} " in logs["prefill"] and f"k_offset={digest} " in logs["decode"]
    assert "k_offset=none " in logs["decode1"]
    per_page = 16 * L * kv_bytes_per_token("fp8_e4m3", H, D)
    rows = [r for r in transfer_rows(logs["prefill"]) if r.status == "ok"]
    assert len(rows) == 4 and all(r.kv_bytes == r.pages * per_page for r in rows)
    assert descendants() == []


def test_offset_of_another_model_stops_start_up(tiny_model, tmp_path):
    import torch

    path = str(tmp_path / "other.safetensors")
    k_offset.save(path, torch.zeros(L, H, D), "SmolLM2-135M#0123456789ab", {})
    with pytest.raises(ClusterError) as err:
        with SingleServer(tiny_model, PAGE, env={"MEMHA_KV_FORMAT": "fp8_e4m3", "MEMHA_K_OFFSET": path},
                          log_dir=str(tmp_path)):
            pass
    text = str(err.value) + open(tmp_path / "server.log").read()
    assert "calibrated for model 'SmolLM2-135M#0123456789ab'" in text and "sglang_memha.calibrate" in text
    assert descendants() == []
