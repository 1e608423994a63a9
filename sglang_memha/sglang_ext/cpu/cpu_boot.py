"""Import hooks installed at interpreter start on CPU hosts, before SGLang loads any plugin.

Why not the entry point: ``import sglang`` itself fails on a CPU host (transformers imports
torchvision, whose CUDA-linked ``_C`` does not load, and ``torchvision._meta_registrations``
then registers fakes for undefined ops), and SGLang's scheduler module imports ``sgl_kernel``
at module level before its process calls ``load_plugins()``. So these two fixes run from a
``.pth`` file that ``python -m sglang_memha.sglang_ext.cpu.cpu_boot --install`` writes into
site-packages (``scripts/setup_cpu.sh`` does it). Everything else uses SGLang's HookRegistry
(see ``cpu_compat``).

Cost at interpreter start: one meta-path finder; nothing is imported until the target
module is. Both hooks are no-ops where the real module works (a CUDA host with
``sgl_kernel`` and a matching torchvision).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

PTH_NAME = "sglang_memha_cpu_boot.pth"
# What the .pth runs at interpreter start. A .pth written before this module moved into ``cpu/``
# names ``sglang_memha.sglang_ext.cpu_boot``, a shim kept for such envs until they re-run set-up.
PTH_LINE = "import sglang_memha.sglang_ext.cpu.cpu_boot as _m; _m.install_finder()\n"


def _real_spec(name: str, path, target, skip) -> importlib.machinery.ModuleSpec | None:
    for finder in sys.meta_path:
        if finder is skip or not hasattr(finder, "find_spec"):
            continue
        spec = finder.find_spec(name, path, target)
        if spec is not None:
            return spec
    return None


def _define_torchvision_ops(_module) -> None:
    """Guards ``torchvision._meta_registrations``: defines ``nms``/``qnms`` schemas when
    torchvision's ``_C`` failed to load (CUDA build on CPU torch), so registering fakes works."""
    import torch
    import torchvision.extension as ext

    if ext._has_ops():
        return
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                   "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
        try:
            lib.define(schema)
        except RuntimeError:  # already defined
            pass
    _KEEP_ALIVE.append(lib)


_KEEP_ALIVE: list = []


class _CpuBootFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sgl_kernel":
            if _real_spec(name, path, target, self) is not None:
                return None  # a real sgl_kernel is installed: use it
            # Guards: sglang/kernels/ops/kvcache/cache_move.py and mem_cache/allocation.py do
            # `from sgl_kernel import ...` at import time; there is no CPU wheel on PyPI.
            # Served as a plain module named sgl_kernel (not a package), so submodule imports
            # such as sgl_kernel.scalar_type raise ImportError and SGLang takes its fallbacks.
            stand_in = os.path.join(os.path.dirname(__file__), "sgl_kernel_cpu.py")
            return importlib.util.spec_from_file_location("sgl_kernel", stand_in)
        if name == "torchvision._meta_registrations":
            spec = _real_spec(name, path, target, self)
            if spec is None:
                return None
            orig = spec.loader.exec_module

            def exec_module(module, _orig=orig):
                _define_torchvision_ops(module)
                _orig(module)

            spec.loader.exec_module = exec_module
            return spec
        return None


def _fork_instead_of_spawn() -> None:
    """``MEMHA_CPU_FORK=1`` (the CPU test harness sets it): SGLang's ``set_start_method("spawn")``
    becomes "fork", so the scheduler and detokenizer processes inherit the launcher's imports
    instead of importing sglang and torch again (~10-16 s of CPU each on a 2-core box, the bulk
    of a server's start). CPU only: nothing has touched CUDA or started threads at that point."""
    import multiprocessing

    orig = multiprocessing.set_start_method

    def set_start_method(method, force=False):
        return orig("fork" if method == "spawn" else method, force=force)

    multiprocessing.set_start_method = set_start_method
    os.register_at_fork(after_in_child=_load_plugins_again)


def _load_plugins_again() -> None:
    """A forked child inherits the launcher's "plugins loaded" flags, but the launcher loaded
    them before the scheduler module existed, so its scheduler hooks were never registered.
    Clearing the flags lets the child's own ``load_plugins()`` register them; targets the
    launcher already patched are skipped by SGLang's ``HookRegistry.apply_hooks``."""
    for module, flag in (("sglang.srt.plugins", "_plugins_loaded"),
                         ("sglang_memha.sglang_ext.plugin", "_registered")):
        if module in sys.modules:
            setattr(sys.modules[module], flag, False)


def install_finder() -> None:
    if os.environ.get("MEMHA_CPU_COMPAT") == "0":
        return
    if os.environ.get("MEMHA_CPU_FORK") == "1":
        _fork_instead_of_spawn()
    if not any(isinstance(f, _CpuBootFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _CpuBootFinder())


def install_pth() -> str:
    """Write the .pth that runs ``install_finder`` at every interpreter start of this env."""
    import sysconfig

    path = os.path.join(sysconfig.get_paths()["purelib"], PTH_NAME)
    with open(path, "w") as f:
        f.write(PTH_LINE)
    return path


if __name__ == "__main__":
    if sys.argv[1:] != ["--install"]:
        sys.exit("usage: python -m sglang_memha.sglang_ext.cpu.cpu_boot --install")
    print(install_pth())
