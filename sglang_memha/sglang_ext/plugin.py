"""Entry point of the ``sglang.srt.plugins`` group: ``memha = sglang_memha.sglang_ext.plugin:register``.

Who calls it: ``sglang.srt.plugins.load_plugins()``, once per process, early: in the launcher
(``launch_server`` before it parses arguments), in each scheduler process (first thing in
``run_scheduler_process``) and in the detokenizer. It only registers hooks; SGLang applies them
right after (``HookRegistry.apply_hooks``). It does not block.

Which hooks a process gets is decided by what that process has already imported: a scheduler
process has imported ``sglang.srt.managers.scheduler`` (it unpickled its target from there),
a detokenizer has not. So no process imports the heavy scheduler stack just to be hooked.
"""
from __future__ import annotations

import logging
import os
import sys

from sglang_memha.config import load_config

logger = logging.getLogger("sglang_memha")

_registered = False


def _log_scheduler_active(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.__init__``: the line tests and operators grep to see the plugin is live
    in a scheduler (``sglang-memha active in scheduler``)."""
    mode = getattr(scheduler.server_args, "disaggregation_mode", "null")
    # WARNING level so the line is in the log whatever --log-level the operator chose.
    cfg = load_config()
    logger.warning("sglang-memha active in scheduler pid=%d disaggregation_mode=%s cpu_compat=%s "
                   "kv_format=%s pipeline=%s", os.getpid(), mode, cfg.cpu_compat_enabled,
                   cfg.kv_format or "stock", f"min_tokens={cfg.pipeline_min_tokens}" if cfg.pipeline else "off")
    return result


def _refuse_bad_config(error: ValueError):
    """SGLang's plugin loader logs and swallows exceptions raised by ``register()``; a bad
    ``MEMHA_*`` value must stop the server instead, so it is raised from a hook on the first
    SGLang call of the process (argument parsing in the launcher, ``Scheduler.__init__``)."""

    def refuse(*args, **kwargs):
        raise SystemExit(f"sglang-memha: bad configuration: {error}")

    return refuse


def _register_attention_backend(HookRegistry, HookType, in_scheduler: bool) -> None:
    """``--attention-backend memha_triton`` (``attention_backend.register``). SGLang's loader logs
    and swallows what ``register()`` raises, so a failure here becomes a hook that stops a
    server asking for that backend, with the reason; servers that do not ask still start."""
    from sglang_memha.sglang_ext import attention_backend

    try:
        attention_backend.register()
    except Exception as e:  # an SGLang without the extension points this targets
        logger.error("sglang-memha: registering --attention-backend %s failed: %r",
                     attention_backend.BACKEND_NAME, e)
        target = ("sglang.srt.managers.scheduler.Scheduler.__init__" if in_scheduler
                  else "sglang.srt.server_args.prepare_server_args")
        HookRegistry.register(target, attention_backend.refuse_if_requested(repr(e)), HookType.BEFORE)


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    in_scheduler = "sglang.srt.managers.scheduler" in sys.modules
    from sglang_memha.sglang_ext import flags

    flags.register()  # --memha-* flags, copied into MEMHA_* before spawning (used by launchers)
    _register_attention_backend(HookRegistry, HookType, in_scheduler)
    try:
        cfg = load_config()
    except ValueError as e:
        target = ("sglang.srt.managers.scheduler.Scheduler.__init__" if in_scheduler
                  else "sglang.srt.server_args.prepare_server_args")
        logger.error("sglang-memha: bad configuration: %s", e)
        HookRegistry.register(target, _refuse_bad_config(e), HookType.BEFORE)
        return
    if cfg.cpu_compat_enabled:
        from sglang_memha.sglang_ext.cpu import cpu_compat

        cpu_compat.register()
    if in_scheduler:
        from sglang_memha.sglang_ext import kv_hooks
        from sglang_memha.sglang_ext.transfer import integrity

        kv_hooks.register_metrics()
        integrity.register()
        if cfg.kv_enabled:
            kv_hooks.register_kv_format()
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.__init__",
                              _log_scheduler_active, HookType.AFTER)
        from sglang_memha.sglang_ext import metrics

        # --enable-metrics: our figures on /metrics (nothing is created without it)
        HookRegistry.register("sglang.srt.managers.scheduler.Scheduler.__init__",
                              metrics.start_in_scheduler, HookType.AFTER)
