"""Former path of ``cpu/cpu_boot.py``, kept only for ``.pth`` files written before the move.

An env set up before the ``cpu/`` subpackage existed has a ``sglang_memha_cpu_boot.pth`` that
runs ``import sglang_memha.sglang_ext.cpu_boot as _m; _m.install_finder()`` at every interpreter
start; without this module that line fails, and on a CPU host ``import sglang`` then fails too.
``scripts/setup_cpu.sh`` (its stamp changed with the move) rewrites the ``.pth`` to the new path
(``python -m sglang_memha.sglang_ext.cpu.cpu_boot --install``). Delete this file once no env
keeps an old ``.pth``.
"""
from sglang_memha.sglang_ext.cpu.cpu_boot import install_finder

__all__ = ["install_finder"]
