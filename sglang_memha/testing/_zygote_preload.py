"""Imported once by the harness's fork server (``zygote.PRELOAD``): what every forked SGLang
server would otherwise import itself. ``http_server`` pulls in the engine, the tokenizer manager,
the scheduler and the model runner; the ``sglang_router`` modules are what the router's launcher
imports (sglang included: ~8 s on a cluster's critical path, as the router starts last). Plugins
are *not* loaded here: SGLang's ``launch_server`` main loads them in each server, with that
server's ``MEMHA_*`` environment."""
import sglang.srt.entrypoints.http_server  # noqa: F401
import sglang_router.mini_lb  # noqa: F401
import sglang_router.router  # noqa: F401
import sglang_router.router_args  # noqa: F401
