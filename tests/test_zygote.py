"""When the harness forks a server from its zygote and when it execs one (``testing/zygote.py``).

No server starts here: every case below must be refused before the fork server is consulted
(``_CTX`` stays None), and ``helper_pids`` is empty while no fork server exists."""
from __future__ import annotations

import sys

import pytest

from sglang_memha.testing import zygote

SERVER = [sys.executable, "-m", "sglang.launch_server", "--model-path", "m"]


@pytest.mark.parametrize("cmd, env_on, why", [
    (SERVER, False, "MEMHA_ZYGOTE unset"),
    ([*SERVER, "--enable-metrics"], True, "prometheus_client decides at import"),
    ([sys.executable, "-c", "print(1)"], True, "not a server module"),
    ([sys.executable, "-m", "sglang.bench_serving"], True, "not in SERVER_MODULES"),
    (["ip", "netns", "exec", "ns", *SERVER], True, "a namespace wrapper"),
])
def test_exec_instead_of_fork(cmd, env_on, why, monkeypatch, tmp_path):
    monkeypatch.setenv("MEMHA_ZYGOTE", "1" if env_on else "0")
    monkeypatch.setattr(zygote, "_CTX", None)
    assert zygote.start_forked(cmd, {}, str(tmp_path / "log")) is None, why
    assert zygote._CTX is None and zygote.helper_pids() == set()


def test_import_time_view_keeps_only_import_time_variables():
    env = {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "MEMHA_KV_FORMAT": "fp8_e4m3",
           "SGLANG_USE_CPU_ENGINE": "1", "MC_FORCE_TCP": "1", "SGLANG_HOST_IP": "10.0.0.1"}
    assert zygote._import_time_view(env) == {"TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
                                             "SGLANG_USE_CPU_ENGINE": "1"}
