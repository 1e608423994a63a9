"""``--memha-*`` launch flags: SGLang-style spellings of the plugin's ``MEMHA_*`` variables.

``python -m sglang.launch_server ... --memha-kv-format fp8_e4m3 --memha-pipeline`` is the same as
``MEMHA_KV_FORMAT=fp8_e4m3 MEMHA_PIPELINE=1 python -m sglang.launch_server ...``: a flag that is
given is written into the launcher's ``os.environ`` before SGLang spawns its scheduler,
tokenizer and detokenizer processes, which inherit it; ``sglang_memha.config.load_config()``
stays the one reader of the configuration. A flag overrides the variable; a flag left out leaves
the variable (set or not) alone.

| flag                               | variable                    |
|------------------------------------|-----------------------------|
| ``--memha-kv-format FMT``          | ``MEMHA_KV_FORMAT``         |
| ``--memha-k-transform {none,hadamard}`` | ``MEMHA_K_TRANSFORM``  |
| ``--memha-k-offset PATH``         | ``MEMHA_K_OFFSET``          |
| ``--memha-decode-dequant {deferred,eager}`` | ``MEMHA_DECODE_DEQUANT`` |
| ``--memha-pipeline``               | ``MEMHA_PIPELINE=1``        |
| ``--memha-pipeline-min-tokens N``  | ``MEMHA_PIPELINE_MIN_TOKENS`` |
| ``--memha-shared-secret-file PATH`` | ``MEMHA_SHARED_SECRET_FILE`` |
| ``--memha-encode-on-send {0,1}``   | ``MEMHA_ENCODE_ON_SEND``    |

There is deliberately no flag carrying the secret itself: a command line is readable by every
local user (``ps``, ``/proc/<pid>/cmdline``) and lands in logs (SGLang logs its launch command),
so the secret is given as a file, or as ``MEMHA_SHARED_SECRET``.

Hooks (registered by ``plugin.register()`` in a process that is not a scheduler, i.e. the
launcher; ``load_plugins()`` applies them before ``prepare_server_args`` parses ``argv``):

- AFTER ``sglang.srt.server_args.ServerArgs.add_cli_args`` (a staticmethod; HookRegistry unwraps
  it, wraps the function and re-wraps it as a staticmethod, so the hook gets
  ``(result, parser)``): adds the argument group ``sglang-memha``. Called by
  ``prepare_server_args`` (and by anything else that builds SGLang's parser, ``--help``
  included). Does not block.
- BEFORE ``sglang.srt.server_args.ServerArgs.from_cli_args`` (a classmethod; the hook gets
  ``(cls, args)`` with the parsed ``argparse.Namespace``): copies the given flags into
  ``os.environ``, then checks the combined configuration with ``load_config()`` and stops the
  launcher (``SystemExit``, the message style of ``plugin._refuse_bad_config``) when it is bad,
  e.g. ``--memha-pipeline`` without a format. Called once by ``prepare_server_args`` right after
  parsing, before any process is spawned. Does not block (reads at most the secret file).
  ``ServerArgs`` itself never sees the flags: ``from_cli_args`` copies only its own fields.

Edges: ``--memha-shared-secret`` is registered (hidden) only to be refused, because argparse's
prefix matching would otherwise read it as ``--memha-shared-secret-file``. ``sglang serve --help``
does not list the group (SGLang prints that help before it loads plugins; ``sglang serve`` with
the flags works, as does ``python -m sglang.launch_server --help``). ``sgl.Engine(...)`` parses no
command line: use the variables there. A bad ``MEMHA_*`` value in the environment is refused by
``plugin.register()``'s own check (BEFORE ``prepare_server_args``), i.e. before the flags are
parsed, so a flag cannot rescue it.
"""
from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("sglang_memha")

GROUP = "sglang-memha"
ADD_CLI_ARGS = "sglang.srt.server_args.ServerArgs.add_cli_args"
FROM_CLI_ARGS = "sglang.srt.server_args.ServerArgs.from_cli_args"

# (flag, argparse dest, variable); the order is the help's order.
FLAGS = (
    ("--memha-kv-format", "memha_kv_format", "MEMHA_KV_FORMAT"),
    ("--memha-k-transform", "memha_k_transform", "MEMHA_K_TRANSFORM"),
    ("--memha-k-offset", "memha_k_offset", "MEMHA_K_OFFSET"),
    ("--memha-decode-dequant", "memha_decode_dequant", "MEMHA_DECODE_DEQUANT"),
    ("--memha-pipeline", "memha_pipeline", "MEMHA_PIPELINE"),
    ("--memha-pipeline-min-tokens", "memha_pipeline_min_tokens", "MEMHA_PIPELINE_MIN_TOKENS"),
    ("--memha-shared-secret-file", "memha_shared_secret_file", "MEMHA_SHARED_SECRET_FILE"),
    ("--memha-encode-on-send", "memha_encode_on_send", "MEMHA_ENCODE_ON_SEND"),
)


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected an integer number of tokens") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n}: expected >= 0")
    return n


class _RefusePlainSecret(argparse.Action):
    """``--memha-shared-secret``: not a flag. Registered anyway so that argparse's prefix matching
    does not read it as ``--memha-shared-secret-file`` (and then print the secret as a missing
    file's name); the error never echoes the value."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"argument {option_string}: not accepted: a secret on the command line is "
                     "visible in ps and logs; put it in a file and pass --memha-shared-secret-file "
                     "PATH, or set MEMHA_SHARED_SECRET")


def add_memha_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``sglang-memha`` group. Every default is ``None`` (= flag not given)."""
    from sglang_memha.config import DECODE_DEQUANT_VALUES, K_TRANSFORM_VALUES
    from sglang_memha.kvformat.spec import KVFormat

    g = parser.add_argument_group(
        GROUP, "sglang-memha plugin. Each flag sets the MEMHA_* variable named in its help for this "
        "server and the processes it starts, overriding that variable; a flag left out leaves the "
        "variable as it is. Give the same format flags to prefill and decode.")
    g.add_argument("--memha-kv-format", default=None, choices=[f.value for f in KVFormat],
                   help="MEMHA_KV_FORMAT: KV format of this server's pool (the plugin's KV path is "
                        "off without it). Needs --attention-backend torch_native and a plain MHA model.")
    g.add_argument("--memha-k-transform", default=None, choices=list(K_TRANSFORM_VALUES),
                   help="MEMHA_K_TRANSFORM (default none): hadamard rotates K before quantizing; "
                        "both servers must agree.")
    g.add_argument("--memha-k-offset", default=None, metavar="PATH",
                   help="MEMHA_K_OFFSET: K offset file from python -m sglang_memha.calibrate; the pool "
                        "quantizes K minus this calibrated vector (exact for attention). Same file on "
                        "both servers.")
    g.add_argument("--memha-decode-dequant", default=None, choices=list(DECODE_DEQUANT_VALUES),
                   help="MEMHA_DECODE_DEQUANT (decode only, default deferred): eager dequantizes "
                        "arrived pages once into a bf16 pool.")
    g.add_argument("--memha-pipeline", default=None, action="store_true",
                   help="MEMHA_PIPELINE=1 (prefill only): ship each layer's KV while later layers "
                        "compute. Needs --memha-kv-format (bf16 for an unquantized pipelined pool).")
    g.add_argument("--memha-pipeline-min-tokens", default=None, type=_non_negative_int, metavar="N",
                   help="MEMHA_PIPELINE_MIN_TOKENS (default 256): shorter prompts are sent whole "
                        "after the forward.")
    g.add_argument("--memha-shared-secret-file", default=None, metavar="PATH",
                   help="MEMHA_SHARED_SECRET_FILE: authenticate the PD handshake with the secret on "
                        "this file's first line (both servers, with --memha-kv-format). There is no "
                        "flag for the secret itself: command lines are visible in ps and logs; use "
                        "this file or the MEMHA_SHARED_SECRET variable.")
    g.add_argument("--memha-encode-on-send", default=None, choices=["0", "1"],
                   help="MEMHA_ENCODE_ON_SEND (prefill on SGLang's own bf16 pool, default 1): convert "
                        "the pages sent to a decode with a memha format into that format; 0 behaves "
                        "as stock SGLang (a memha decode refuses this prefill).")
    g.add_argument("--memha-shared-secret", nargs="?", action=_RefusePlainSecret, default=None,
                   dest="memha_refused_plain_secret", help=argparse.SUPPRESS)


def environ_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The ``MEMHA_*`` values the given flags stand for (flags left out are absent)."""
    out = {}
    for _flag, dest, var in FLAGS:
        value = getattr(args, dest, None)
        if value is None:
            continue
        if isinstance(value, bool):
            value = "1" if value else "0"
        out[var] = str(value)
    return out


def apply_args(args: argparse.Namespace) -> dict[str, str]:
    """Write the given flags into ``os.environ`` and check the combined configuration.

    Returns what was set. Raises ``SystemExit`` with ``sglang-memha: bad configuration: ...``
    when ``load_config()`` rejects the result."""
    from sglang_memha.config import load_config

    given = environ_from_args(args)
    if not given:
        return given
    os.environ.update(given)
    try:
        load_config()
    except ValueError as e:
        flags = " ".join(f for f, _dest, var in FLAGS if var in given)
        logger.error("sglang-memha: bad configuration: %s (flags given: %s)", e, flags)
        raise SystemExit(f"sglang-memha: bad configuration: {e} (flags given: {flags})") from None
    logger.info("sglang-memha flags set %s", ", ".join(
        f"{k}={v}" for k, v in given.items()))
    return given


def _after_add_cli_args(result, parser, *args, **kwargs):
    """AFTER ``ServerArgs.add_cli_args(parser)``."""
    add_memha_args(parser)
    return result


def _before_from_cli_args(cls, args, *rest, **kwargs):
    """BEFORE ``ServerArgs.from_cli_args(args)``; returns None (arguments unchanged)."""
    apply_args(args)


def register_launcher_hooks() -> None:
    """Register both hooks (``HookRegistry.apply_hooks()`` applies them)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(ADD_CLI_ARGS, _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(FROM_CLI_ARGS, _before_from_cli_args, HookType.BEFORE)


def register() -> None:
    """From ``plugin.register()``, in every process. Not only where the scheduler stack is absent:
    a launcher forked from a process that preloaded SGLang (the test harness's zygote) has the
    scheduler module imported and still parses the command line. A scheduler or detokenizer
    never calls ``add_cli_args`` / ``from_cli_args``, so there the hooks are inert."""
    register_launcher_hooks()
