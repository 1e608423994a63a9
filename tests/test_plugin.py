"""The plugin's registration and CPU compat pieces, without starting a server."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from importlib.metadata import entry_points

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_entry_point_registered():
    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("memha") == "sglang_memha.sglang_ext.plugin:register"


def test_package_imports_without_sglang():
    code = ("import sys, sglang_memha, sglang_memha.config, sglang_memha.kvformat; "
            "assert 'sglang' not in sys.modules, sorted(m for m in sys.modules if m.startswith('sglang.'))")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_config_rejects_bad_value(monkeypatch):
    from sglang_memha.config import load_config

    monkeypatch.setenv("MEMHA_CPU_COMPAT", "yes")
    with pytest.raises(ValueError, match="MEMHA_CPU_COMPAT='yes'"):
        load_config()


def test_sgl_kernel_stand_in_served_as_plain_module():
    code = ("import sgl_kernel; assert sgl_kernel.__version__.endswith('memha.cpu'); "
            "import importlib.util as u\n"
            "try:\n import sgl_kernel.scalar_type\nexcept ImportError: pass\n"
            "else: raise SystemExit('sgl_kernel must not be a package')")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_stand_in_unknown_op_raises_naming_it():
    from sglang_memha.sglang_ext.cpu import sgl_kernel_cpu

    with pytest.raises(NotImplementedError, match="sgl_kernel.fancy_op"):
        sgl_kernel_cpu.fancy_op(1)


def test_assign_req_to_token_pool_matches_reference():
    from sglang_memha.sglang_ext.cpu.sgl_kernel_cpu import assign_req_to_token_pool_cpu

    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    rows, starts, ends = torch.tensor([2, 0]), torch.tensor([1, 3]), torch.tensor([4, 5])
    locs = torch.arange(100, 105)
    assign_req_to_token_pool_cpu(rows, req_to_token, starts, ends, locs, 10)
    expected = torch.zeros(4, 10, dtype=torch.int32)
    expected[2, 1:4] = torch.tensor([100, 101, 102])
    expected[0, 3:5] = torch.tensor([103, 104])
    assert torch.equal(req_to_token, expected)


def test_copy_all_layer_kv_cache_moves_rows_in_every_buffer():
    from sglang_memha.sglang_ext.cpu.sgl_kernel_cpu import copy_all_layer_kv_cache_cpu

    bufs = [torch.arange(40, dtype=torch.float32).reshape(10, 4) + 1000 * i for i in range(3)]
    before = [b.clone() for b in bufs]
    ptrs = torch.tensor([b.data_ptr() for b in bufs])
    strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
    copy_all_layer_kv_cache_cpu(ptrs, strides, torch.tensor([7, 8]), torch.tensor([1, 2]))
    for b, ref in zip(bufs, before):
        ref[[7, 8]] = ref[[1, 2]]
        assert torch.equal(b, ref)


def test_cpu_boot_pth_installed():
    pth = os.path.join(sysconfig.get_paths()["purelib"], "sglang_memha_cpu_boot.pth")
    assert os.path.exists(pth), "run scripts/setup_cpu.sh (it installs the CPU boot .pth)"


@pytest.mark.parametrize("line", ["new", "pre-cpu/ (shim)"])
def test_cpu_boot_pth_line_installs_the_finder(line):
    """The line ``cpu_boot --install`` writes, and the one an env set up before ``cpu/`` existed
    still has, both install the CPU boot finder (``-S``: no site-packages, so no installed .pth)."""
    from sglang_memha.sglang_ext.cpu.cpu_boot import PTH_LINE

    pth = PTH_LINE if line == "new" else "import sglang_memha.sglang_ext.cpu_boot as _m; _m.install_finder()"
    code = (f"import sys; sys.path.insert(0, {REPO!r})\n{pth}\n"
            "assert any(type(f).__name__ == '_CpuBootFinder' for f in sys.meta_path), sys.meta_path")
    env = {k: v for k, v in os.environ.items() if k != "MEMHA_CPU_COMPAT"}
    subprocess.run([sys.executable, "-S", "-c", code], check=True, env=env)


def test_upstream_patch_applies_to_pinned_sglang():
    sp = sysconfig.get_paths()["purelib"]
    with open(os.path.join(REPO, "patches", "0001-cpu-pd-guards.patch")) as f:
        r = subprocess.run(["patch", "--dry-run", "-p1", "-d", sp], stdin=f, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FAILED" not in r.stdout and "Reversed" not in r.stdout


def test_plugin_hooks_decode_backup_default(monkeypatch):
    """In a launcher process, the plugin makes an unset decode retraction backup cpu_tensor and
    keeps an explicit one."""
    code = r"""
import os
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
import sglang.srt.server_args as sa
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.server_args import prepare_server_args
base = ["--model-path", "/nonexistent", "--device", "cpu", "--disaggregation-mode", "decode"]
a = sa.prepare_server_args(base)
b = sa.prepare_server_args(base + ["--disaggregation-decode-retraction-backup", "host_pool"])
c = sa.prepare_server_args(["--model-path", "/nonexistent", "--device", "cpu"])
print(a.disaggregation_decode_retraction_backup, b.disaggregation_decode_retraction_backup,
      c.disaggregation_decode_retraction_backup)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-3:] == ["cpu_tensor", "host_pool", "None"]
