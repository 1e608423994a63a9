"""``--memha-*`` launch flags (``sglang_ext/flags.py``): parsed by SGLang's own parser, copied into
``MEMHA_*`` before the scheduler starts, checked with ``load_config()``."""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from sglang_memha.sglang_ext import flags

MEMHA_VARS = [var for _flag, _dest, var in flags.FLAGS] + ["MEMHA_SHARED_SECRET"]
BASE = ["--model-path", "/nonexistent", "--device", "cpu"]


@pytest.fixture
def clean_env(monkeypatch):
    """No MEMHA_* variable the flags touch is set, and whatever a test (or a hook) sets is removed
    afterwards: setenv records "was unset", delenv then clears it for the test."""
    for var in MEMHA_VARS:
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    return monkeypatch


@pytest.fixture
def server_args(clean_env):
    """``sglang.srt.server_args`` with only this module's hooks applied by HookRegistry, in this
    process, the way ``load_plugins()`` applies them; the original methods and the registry's
    state are put back afterwards."""
    import sglang.srt.server_args as sa
    from sglang.srt.plugins.hook_registry import HookRegistry

    raw = {name: sa.ServerArgs.__dict__[name] for name in ("add_cli_args", "from_cli_args")}
    saved_hooks = {k: list(v) for k, v in HookRegistry._hooks.items()}
    saved_patched = set(HookRegistry._patched)
    HookRegistry.reset()
    # prepare_server_args reconfigures the root logger (force=True); keep pytest's handlers.
    clean_env.setattr(logging, "basicConfig", lambda **kwargs: None)
    try:
        flags.register_launcher_hooks()
        HookRegistry.apply_hooks()
        # staticmethod / classmethod survive the patch (HookRegistry unwraps and re-wraps them).
        assert isinstance(sa.ServerArgs.__dict__["add_cli_args"], staticmethod)
        assert isinstance(sa.ServerArgs.__dict__["from_cli_args"], classmethod)
        assert sa.ServerArgs.__dict__["from_cli_args"] is not raw["from_cli_args"]
        yield sa
    finally:
        for name, value in raw.items():
            setattr(sa.ServerArgs, name, value)
        HookRegistry.reset()
        HookRegistry._hooks.update(saved_hooks)
        HookRegistry._patched.update(saved_patched)


def _memha_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in MEMHA_VARS}


def test_flags_set_environment(server_args, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    args = server_args.prepare_server_args(BASE + [
        "--memha-kv-format", "fp8_e4m3", "--memha-k-transform", "hadamard",
        "--memha-decode-dequant", "eager", "--memha-pipeline", "--memha-pipeline-min-tokens", "64",
        "--memha-shared-secret-file", str(secret), "--memha-encode-on-send", "0"])
    assert type(args).__name__ == "ServerArgs" and not hasattr(args, "memha_kv_format")
    assert _memha_env() == {
        "MEMHA_KV_FORMAT": "fp8_e4m3", "MEMHA_K_TRANSFORM": "hadamard", "MEMHA_DECODE_DEQUANT": "eager",
        "MEMHA_PIPELINE": "1", "MEMHA_PIPELINE_MIN_TOKENS": "64", "MEMHA_SHARED_SECRET_FILE": str(secret),
        "MEMHA_ENCODE_ON_SEND": "0"}
    from sglang_memha.config import load_config

    cfg = load_config()
    assert (cfg.kv_format, cfg.pipeline, cfg.pipeline_min_tokens, cfg.shared_secret, cfg.encode_on_send) == (
        "fp8_e4m3", True, 64, "s3cret", False)


def test_flag_overrides_variable_and_absent_flag_leaves_it(server_args, monkeypatch):
    monkeypatch.setenv("MEMHA_KV_FORMAT", "bf16")
    monkeypatch.setenv("MEMHA_PIPELINE_MIN_TOKENS", "512")
    server_args.prepare_server_args(BASE + ["--memha-kv-format", "int8"])
    assert _memha_env() == {"MEMHA_KV_FORMAT": "int8", "MEMHA_PIPELINE_MIN_TOKENS": "512"}


def test_no_flags_touch_nothing(server_args, monkeypatch):
    monkeypatch.setenv("MEMHA_KV_FORMAT", "bf16")
    server_args.prepare_server_args(BASE)
    assert _memha_env() == {"MEMHA_KV_FORMAT": "bf16"}


@pytest.mark.parametrize("argv, words", [
    (["--memha-kv-format", "fp7"], ["--memha-kv-format", "fp7", "int4_g64"]),
    (["--memha-k-transform", "fft"], ["--memha-k-transform", "hadamard"]),
    (["--memha-decode-dequant", "lazy"], ["--memha-decode-dequant", "eager"]),
    (["--memha-pipeline-min-tokens", "-1"], ["--memha-pipeline-min-tokens", ">= 0"]),
    (["--memha-pipeline-min-tokens", "many"], ["--memha-pipeline-min-tokens", "'many'"]),
])
def test_bad_value_error_names_the_flag(server_args, capsys, argv, words):
    with pytest.raises(SystemExit) as err:
        server_args.prepare_server_args(BASE + argv)
    assert err.value.code == 2  # argparse's usage error
    stderr = capsys.readouterr().err
    assert all(w in stderr for w in words), stderr
    assert _memha_env() == {}


def test_pipeline_without_format_refused(server_args):
    with pytest.raises(SystemExit) as err:
        server_args.prepare_server_args(BASE + ["--memha-pipeline"])
    msg = str(err.value.code)
    assert msg.startswith("sglang-memha: bad configuration: MEMHA_PIPELINE=1 needs MEMHA_KV_FORMAT")
    assert "--memha-pipeline" in msg


def test_pipeline_flag_with_format_from_environment_accepted(server_args, monkeypatch):
    monkeypatch.setenv("MEMHA_KV_FORMAT", "bf16")
    server_args.prepare_server_args(BASE + ["--memha-pipeline"])
    assert _memha_env() == {"MEMHA_KV_FORMAT": "bf16", "MEMHA_PIPELINE": "1"}


def test_unreadable_secret_file_refused(server_args, tmp_path):
    missing = str(tmp_path / "missing")
    with pytest.raises(SystemExit) as err:
        server_args.prepare_server_args(BASE + ["--memha-kv-format", "bf16",
                                                "--memha-shared-secret-file", missing])
    msg = str(err.value.code)
    assert "sglang-memha: bad configuration: MEMHA_SHARED_SECRET_FILE" in msg and missing in msg
    assert "--memha-shared-secret-file" in msg


@pytest.mark.parametrize("argv", [["--memha-shared-secret", "s3cret"], ["--memha-shared-secret=s3cret"]])
def test_no_plain_secret_flag(server_args, capsys, argv):
    """Refused (not read as an abbreviation of --memha-shared-secret-file), without echoing it."""
    with pytest.raises(SystemExit) as err:
        server_args.prepare_server_args(BASE + argv)
    assert err.value.code == 2
    stderr = capsys.readouterr().err
    assert "--memha-shared-secret: not accepted" in stderr and "--memha-shared-secret-file" in stderr
    assert "s3cret" not in stderr
    assert _memha_env() == {}


def test_launch_server_help_lists_flags():
    """Through the real entry point: ``load_plugins()`` in ``sglang.launch_server`` registers the
    hooks before ``--help`` is parsed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMHA_")}
    env["SGLANG_USE_CPU_ENGINE"] = "1"
    r = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sglang-memha:" in r.stdout  # the argument group's title
    for flag, _dest, _var in flags.FLAGS:
        assert flag in r.stdout, flag
    text = " ".join(r.stdout.split())  # argparse wraps help lines
    assert "MEMHA_SHARED_SECRET_FILE" in text and "command lines are visible in ps and logs" in text
    assert "--memha-shared-secret " not in text  # the refusing spelling stays out of the help


@pytest.mark.cluster
def test_server_started_with_format_flag(tiny_model, tmp_path):
    """A real server: the flag beats the variable (bf16) and reaches the scheduler process."""
    from sglang_memha.testing import SingleServer

    with SingleServer(tiny_model, ["--page-size", "16", "--memha-kv-format", "fp8_e4m3"],
                      env={"MEMHA_KV_FORMAT": "bf16", "MEMHA_PIPELINE": "0"},
                      log_dir=str(tmp_path)) as s:
        status, body = s.generate("Hello", max_new_tokens=4)
        assert status == 200, body
        log = s.logs()["server"]
    assert "sglang-memha KV pool: format=fp8_e4m3" in log
    assert "kv_format=fp8_e4m3" in log  # the scheduler's "sglang-memha active" line
