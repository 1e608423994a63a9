"""CPU time of a server's processes and threads, from Linux ``/proc`` (for benchmarks that must
say where a shared box's cores went: ``eval/bench_serving_pd.py``).

A server started by the harness leads its own process group (its scheduler and detokenizer are
in it), so ``group_cpu_s(pid)`` is the whole server. Threads are named by their ``comm``
(Python threads started by SGLang or by us carry the name given at creation, truncated to 15
characters; Mooncake's C++ threads inherit the process name), and keyed by ``pid/tid`` so two
threads of one name stay apart.
"""
from __future__ import annotations

import os

from sglang_memha.testing.procs import group_members, proc_stat

_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(fields: list[bytes]) -> float:
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def group_cpu_s(pgid: int) -> float:
    """User + system CPU seconds of every process in process group ``pgid``."""
    return sum(_cpu(fields) for fields in (group_members(pgid) or {}).values())


def thread_cpu_s(pgid: int) -> dict[str, tuple[str, float]]:
    """``{"pid/tid": (thread name, CPU s)}`` for every thread of every process in group ``pgid``."""
    out = {}
    for pid in group_members(pgid) or {}:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            t = proc_stat(f"/proc/{pid}/task/{tid}/stat")
            if t is not None:
                out[f"{pid}/{tid}"] = (t[0], _cpu(t[1]))
    return out


def top_threads(before: dict, after: dict, n: int = 6) -> list[tuple[str, float]]:
    """The ``n`` threads that used the most CPU between two ``thread_cpu_s`` readings, as
    ``("name (pid/tid)", seconds)``, busiest first."""
    used = [(f"{name} ({key})", cpu - before.get(key, (name, 0.0))[1]) for key, (name, cpu) in after.items()]
    return [(k, round(v, 2)) for k, v in sorted(used, key=lambda kv: -kv[1])[:n]]
