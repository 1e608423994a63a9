"""The launch command lines of the GPU scripts and the deploy guide, checked by SGLang's own parsers.

Two halves, so that a test can hold the docs to the code without starting a server:

* extraction (this process, no SGLang import): ``script_commands`` runs a launch script with
  bash, and ``doc_commands`` runs each command line of a Markdown file's fenced code blocks with
  bash, both with a stand-in ``python`` first on ``PATH`` that records its argv and ``MEMHA_*``
  environment instead of starting anything. Bash itself expands the variables (``set -u``: an
  unset one fails the line), the ``\\`` continuations, the scripts' arrays and branches, so the
  argv is exactly what the real command would get.
* checking (``check_commands``: one child process, ``python -m sglang_memha.testing.launch_lines``):
  loads SGLang's plugins the way ``sglang.launch_server`` does (so ``--attention-backend
  memha_triton`` and the ``--memha-*`` flags exist only if this plugin registers them), then
  parses each argv with the parser of the program it names: ``prepare_server_args`` (SGLang's
  parser and ``ServerArgs.from_cli_args``, with the plugin's hooks), ``sglang_router``'s
  ``parse_router_args``, and ``bench_serving``'s ``cli_main`` with its ``run_benchmark``
  replaced by a no-op. A child process, because plugin loading patches SGLang for the whole
  process and the flags write ``MEMHA_*`` into ``os.environ``.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

SERVER = "sglang.launch_server"
ROUTER = "sglang_router.launch_router"
BENCH = ("sglang.bench_serving", "sglang.benchmark.serving")
PROGRAMS = (SERVER, ROUTER, *BENCH)

# A logical line (continuations joined) that runs one of PROGRAMS, or one of the launch scripts,
# after optional VAR=value assignments.
_ASSIGN = r"(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*"
_PY_LINE = re.compile(_ASSIGN + r"python3?\s+-m\s+(" + "|".join(re.escape(p) for p in PROGRAMS) + r")(\s|$)")
_SCRIPT_LINE = re.compile(_ASSIGN + r"(?:\./)?launch_scripts/[\w-]+\.sh(\s|$)")
_FENCE = re.compile(r"^```")

# The stand-in interpreter: writes one JSON line per call (argv after the interpreter, and the
# MEMHA_* variables it would have passed on) to the file named by LAUNCH_LINES_OUT.
_FAKE_PYTHON = """#!{python}
import json, os, sys
with open(os.environ["LAUNCH_LINES_OUT"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": {{k: v for k, v in os.environ.items()
                                                     if k.startswith("MEMHA_")}}}}) + "\\n")
"""


@dataclass
class Command:
    """One program invocation: ``argv`` is what follows the interpreter (``-m``, module, flags)."""

    source: str  # "docs/deploy_gpu.md:120" or "launch_scripts/gpu_prefill.sh (IB_DEVICE=)"
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # the MEMHA_* variables the program saw

    @property
    def program(self) -> str:
        return self.argv[1] if len(self.argv) > 1 and self.argv[0] == "-m" else "?"


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, line) of each command in the fenced code blocks of a Markdown text,
    with backslash continuations joined and comment-only lines dropped."""
    out, in_block, pending, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line.strip()):
            in_block, pending = not in_block, ""
            continue
        if not in_block:
            continue
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        out.append((start, pending + stripped))
        pending = ""
    return out


def launch_lines(text: str) -> list[tuple[int, str]]:
    """The ``logical_lines`` that start a server, the router, bench_serving or a launch script."""
    return [(n, line) for n, line in logical_lines(text) if _PY_LINE.match(line) or _SCRIPT_LINE.match(line)]


def _run_bash(script: str, cwd: str, label: str) -> list[Command]:
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("python", "python3"):
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(_FAKE_PYTHON.format(python=sys.executable))
            os.chmod(path, 0o755)
        out = os.path.join(tmp, "calls.jsonl")
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMHA_")}
        env.update(PATH=f"{tmp}:{env.get('PATH', '/usr/bin:/bin')}", LAUNCH_LINES_OUT=out)
        r = subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise ValueError(f"{label}: bash failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")
        if not os.path.exists(out):
            raise ValueError(f"{label}: ran without calling python")
        with open(out) as f:
            return [Command(label, **json.loads(line)) for line in f]


def script_commands(script: str, env_file: str, repo: str, overrides: dict[str, str] | None = None,
                    args: list[str] | None = None) -> list[Command]:
    """What ``bash script args`` runs, after ``source env_file`` and with ``overrides`` exported."""
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (overrides or {}).items())
    label = os.path.relpath(script, repo) + "".join(f" ({k}={v})" for k, v in (overrides or {}).items())
    body = f"set -euo pipefail; source {shlex.quote(env_file)}; {exports}bash {shlex.quote(script)} " + \
        " ".join(shlex.quote(a) for a in args or [])
    return _run_bash(body, repo, label)


def doc_commands(doc: str, env_file: str, repo: str, overrides: dict[str, str] | None = None) -> list[Command]:
    """Every launch line of a Markdown file, each run on its own after ``source env_file`` and
    with ``overrides`` exported (values a reader is told to fill in)."""
    with open(doc) as f:
        lines = launch_lines(f.read())
    exports = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (overrides or {}).items())
    out = []
    for n, line in lines:
        label = f"{os.path.relpath(doc, repo)}:{n}"
        out += _run_bash(f"set -euo pipefail; source {shlex.quote(env_file)}; {exports}{line}", repo, label)
    return out


# ---- checking (the child process) --------------------------------------------------------------
def _parse_one(cmd: dict) -> str | None:
    """None when the program's own parser accepts ``cmd``'s argv, else its message."""
    from sglang.srt.server_args import prepare_server_args

    argv, program = cmd["argv"][2:], cmd["argv"][1]
    saved = dict(os.environ)
    os.environ.update(cmd["env"])
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            if program == SERVER:
                from sglang_memha.config import load_config

                prepare_server_args(argv)
                load_config()  # the MEMHA_* the line set without a flag: what plugin.register() checks
            elif program == ROUTER:
                from sglang_router.launch_router import parse_router_args

                parse_router_args(argv)
            elif program in BENCH:
                import sglang.benchmark.serving as bench

                real_argv, real_run = sys.argv, bench.run_benchmark
                sys.argv, bench.run_benchmark = [program, *argv], lambda args: None
                try:
                    bench.cli_main()
                finally:
                    sys.argv, bench.run_benchmark = real_argv, real_run
            else:
                return f"not a program this checker knows: {cmd['argv'][:2]}"
    except SystemExit as e:  # argparse: exit 2 and its message on stderr; the plugin: the message
        lines = err.getvalue().strip().splitlines()
        return e.code if isinstance(e.code, str) else (lines[-1] if lines else f"exit {e.code}")
    except Exception as e:  # a parser's own validation error (ValueError and the like)
        return f"{type(e).__name__}: {e}"
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return None


def _worker(in_path: str, out_path: str) -> None:
    import logging

    from sglang.srt.plugins import load_plugins

    load_plugins()  # what sglang.launch_server does before it parses argv
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES

    # prepare_server_args re-configures the root logger each call; keep its output off stdout.
    logging.disable(logging.CRITICAL)
    with open(in_path) as f:
        commands = json.load(f)
    result = {"plugin_backend_registered": "memha_triton" in ATTENTION_BACKEND_CHOICES,
              "errors": [_parse_one(c) for c in commands]}
    with open(out_path, "w") as f:
        json.dump(result, f)


def check_commands(commands: list[Command], repo: str, timeout_s: float = 300) -> dict:
    """Parse every command in one child process; returns ``{"plugin_backend_registered": bool,
    "errors": [None or message, one per command]}``."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump([asdict(c) for c in commands], f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMHA_")}
        env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        r = subprocess.run([sys.executable, "-m", "sglang_memha.testing.launch_lines", src, dst], env=env,
                           capture_output=True, text=True, timeout=timeout_s)
        if r.returncode != 0 or not os.path.exists(dst):
            raise RuntimeError(f"launch_lines checker failed (exit {r.returncode}): {r.stderr[-2000:]}")
        with open(dst) as f:
            return json.load(f)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
