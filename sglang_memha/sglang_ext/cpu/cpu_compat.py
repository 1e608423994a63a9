"""HookRegistry hooks that let SGLang 0.5.23's PD path run with ``--device cpu``.

Applied only when CPU compat is on (``MEMHA_CPU_COMPAT``; by default when SGLang's own
``SGLANG_USE_CPU_ENGINE=1`` is set). Each hook names the SGLang code path it guards; the
upstream fixes are kept as ``patches/0001-cpu-pd-guards.patch``.
"""
from __future__ import annotations

import logging
import os
import sys
import time

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

logger = logging.getLogger(__name__)

EARLY_SEND_ENV = "SGLANG_DISAGG_PREFILL_EARLY_SEND_CACHED_PREFIX"
PD_WAIT_POLL_S = 0.001  # how long a PD scheduler that only waits on a transfer sleeps per loop


def _decode_backup_cpu_tensor(server_args, *args, **kwargs):
    """AFTER ``sglang.srt.server_args.prepare_server_args``.

    Guards ``mem_cache/kv_cache_builder.py resolve_decode_retraction_backup``: on a decode server
    it infers ``host_pool``, whose pinned buffers call ``cudaHostRegister``
    (``mem_cache/pool_host/common.py _cuda_host_register``) and abort on a CPU torch. An explicit
    operator choice is kept; only the unset default becomes ``cpu_tensor``.
    """
    if (getattr(server_args, "disaggregation_mode", "null") == "decode"
            and getattr(server_args, "disaggregation_decode_retraction_backup", None) is None):
        server_args.disaggregation_decode_retraction_backup = "cpu_tensor"
    return server_args


def _cpu_mooncake_sender_class():
    from sglang.srt.disaggregation.mooncake.conn import MooncakeKVSender

    class CpuMooncakeKVSender(MooncakeKVSender):
        """Guards ``disaggregation/prefill.py send_kv_chunk``: with
        ``supports_host_tensor_indices`` it copies page indices into a pinned host tensor and
        records a ``torch.cuda.Event``; neither exists on CPU, where indices already are host
        tensors."""

        supports_host_tensor_indices = False

    return CpuMooncakeKVSender


def _pd_wait_without_spinning(original, scheduler, *args, **kwargs):
    """AROUND ``Scheduler.on_idle``.

    Guards ``managers/scheduler.py on_idle``: a PD scheduler with no batch to run but a request
    in flight (decode waiting for KV, prefill waiting for a transfer or a bootstrap) is "not
    fully idle" and loops with ``time.sleep(0)``, spinning a core. On a GPU host that core is
    free; on this 2-core testbed it is the core the *other* server's forward needs, so the
    decode's wait halved the prefill's speed and every TTFT measured CPU contention, not the
    link. Sleeping 1 ms per loop instead adds at most 1 ms to noticing an arrival.
    """
    from sglang.srt.disaggregation.utils import DisaggregationMode

    result = original(scheduler, *args, **kwargs)
    if scheduler.disaggregation_mode != DisaggregationMode.NULL and not scheduler.is_fully_idle():
        time.sleep(PD_WAIT_POLL_S)
    return result


def register_main_process_hooks() -> None:
    """Hooks for the launcher process (``sglang.launch_server`` / ``sglang serve``)."""
    HookRegistry.register("sglang.srt.server_args.prepare_server_args",
                          _decode_backup_cpu_tensor, HookType.AFTER)


def register_scheduler_hooks() -> None:
    """Hooks for a scheduler process (the one that runs prefill/decode and the KV transfer)."""
    HookRegistry.register("sglang.srt.disaggregation.mooncake.conn.MooncakeKVSender",
                          _cpu_mooncake_sender_class(), HookType.REPLACE)
    HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.on_idle",
                          _pd_wait_without_spinning, HookType.AROUND)


def register() -> None:
    # Guards prefill.py maybe_send_cached_prefix_chunk: under the overlap scheduler a radix-cache
    # hit records torch.cuda.Event(), which cannot be instantiated on CPU. SGLang reads this
    # EnvBool at call time; setting it in the launcher is inherited by the scheduler it spawns.
    os.environ.setdefault(EARLY_SEND_ENV, "0")
    if "sglang.srt.server_args" in sys.modules:
        register_main_process_hooks()
    if "sglang.srt.managers.scheduler" in sys.modules:
        register_scheduler_hooks()
