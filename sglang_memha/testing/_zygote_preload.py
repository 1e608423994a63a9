"""Imported once by the harness's fork server (``zygote.PRELOAD``): what every forked SGLang
server would otherwise import itself. ``http_server`` pulls in the engine, the tokenizer manager,
the scheduler and the model runner; plugins are *not* loaded here (SGLang's ``launch_server``
main loads them in each server, with that server's ``MEMHA_*`` environment)."""
import sglang.srt.entrypoints.http_server  # noqa: F401
