"""The test-only corruption plugin (``sglang_memha/testing/kv_corruption.py``) without servers:
a process started with ``server_env`` finds it in SGLang's plugin group, ``load_plugins()`` hooks
it into the decode's arrival path, and it flips exactly one byte of a listed room's KV there.
A process without that environment is untouched, and production code never reads its knob.
``tests/quant/test_integrity_pd.py`` (cluster) shows the checksum catching the flip in a real PD pair."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from sglang_memha.testing import kv_corruption

REPO = pathlib.Path(__file__).resolve().parents[2]

ARRIVAL = r"""
import os, logging
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
from importlib.metadata import entry_points
from types import SimpleNamespace as NS
import torch
from sglang.srt.plugins import load_plugins

print("PLUGINS", sorted(ep.name for ep in entry_points(group="sglang.srt.plugins")))
load_plugins()
from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool
from sglang_memha.sglang_ext.transfer.arrival import land_on_arrival

pool = MemhaQuantKVPool.configured("int4_g64", "none", "t#0")(
    64, page_size=16, dtype=torch.bfloat16, head_num=2, head_dim=64, layer_num=2, device="cpu",
    enable_memory_saver=False)
sched = NS(token_to_kv_pool_allocator=NS(get_kvcache=lambda: pool),
           req_to_token_pool=NS(req_to_token=torch.arange(64, dtype=torch.int32).reshape(2, 32)),
           disagg_decode_prealloc_queue=NS(kv_manager=NS(memha_bridges={})), kv_checksum_computer=None)
before = [b.clone() for b in (*pool.k_buffer, *pool.v_buffer, *pool.k_scale_buffer, *pool.v_scale_buffer)]
for room, row in ((5, 1), (9, 0)):  # 5 is listed, 9 is not
    req = NS(bootstrap_room=room, finished_reason=None, kv=NS(req_pool_idx=row, cache_protected_len=0),
             origin_input_ids=[1] * 10, expected_kv_checksum=0, rid=str(room))
    land_on_arrival(None, NS(scheduler=sched), NS(req=req))
after = (*pool.k_buffer, *pool.v_buffer, *pool.k_scale_buffer, *pool.v_scale_buffer)
print("CHANGED", [(i, *map(int, idx)) for i, (b, a) in enumerate(zip(before, after)) for idx in (b != a).nonzero()])
"""


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != kv_corruption.ROOMS_ENV}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", ARRIVAL], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)


def test_plugin_loaded_by_sglang_flips_one_byte_of_a_listed_room_on_arrival(tmp_path):
    r = _run(kv_corruption.server_env(str(tmp_path), [5, 7]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"'{kv_corruption.ENTRY_POINT}'" in r.stdout and "'memha'" in r.stdout, r.stdout
    # room 5's first token is slot req_to_token[1, 0] = 32: layer 0 K data, head 0, byte 0
    assert "CHANGED [(0, 32, 0, 0)]" in r.stdout, r.stdout
    assert "corrupted one KV byte of room 5 on arrival" in r.stderr
    assert "room 9" not in r.stderr


def test_without_the_plugin_env_nothing_is_corrupted():
    r = _run({})
    assert r.returncode == 0, r.stderr[-3000:]
    assert kv_corruption.ENTRY_POINT not in r.stdout and "CHANGED []" in r.stdout, r.stdout


def test_server_env_keeps_the_callers_pythonpath(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = kv_corruption.server_env(str(tmp_path), [3])
    assert env == {"PYTHONPATH": f"{tmp_path}{os.pathsep}/elsewhere", kv_corruption.ROOMS_ENV: "3"}
    monkeypatch.setenv(kv_corruption.ROOMS_ENV, "1,x")
    with pytest.raises(ValueError, match="MEMHA_TEST_CORRUPT_KV_ROOMS='1,x'"):
        kv_corruption.rooms_from_env()


def test_production_code_never_reads_the_test_knob():
    pkg = REPO / "sglang_memha"
    readers = [str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
               if "MEMHA_TEST_" in p.read_text() and p.parent.name != "testing"]
    assert readers == []
