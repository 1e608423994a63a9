"""Every command line of the GPU launch scripts and of ``docs/deploy_gpu.md`` is accepted by the
parser of the program it starts, with this plugin loaded; every environment variable they name
is read by the code it is meant for.

No server starts: ``sglang_memha.testing.launch_lines`` runs the scripts and the guide's lines
under bash with a stand-in ``python`` that records the argv, then one child process loads
SGLang's plugins (as ``sglang.launch_server`` does) and parses each argv with SGLang's
``prepare_server_args``, the router's ``parse_router_args`` or ``bench_serving``'s ``cli_main``.
The same child parses deliberately wrong lines, which must be refused with the parser's reason.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import re

import pytest

pytest.importorskip("sglang")
pytest.importorskip("sglang_router")

from sglang_memha.testing.launch_lines import (  # noqa: E402
    BENCH, ROUTER, SERVER, Command, check_commands, doc_commands, launch_lines, script_commands)

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV_FILE = str(REPO / "launch_scripts" / "gpu_env.example")
DOC = str(REPO / "docs" / "deploy_gpu.md")
SCRIPTS = sorted(str(p) for p in (REPO / "launch_scripts").glob("gpu_*.sh"))
# The guide's RDMA lines read $IB_DEVICE, which the example leaves empty (= TCP): the value a
# reader is told to fill in.
DOC_OVERRIDES = {"IB_DEVICE": "mlx5_0"}
# Flags the guide passes to the scripts, so the scripts are checked with them too.
SCRIPT_ARGS = {"gpu_prefill.sh": ["--attention-backend", "memha_triton", "--page-size", "16",
                                  "--memha-kv-format", "fp8_e4m3", "--memha-pipeline"],
               "gpu_decode.sh": ["--attention-backend", "memha_triton", "--page-size", "16",
                                 "--memha-kv-format", "fp8_e4m3"],
               "gpu_router.sh": ["--max-concurrent-requests", "256"]}

# (wrong command, words its refusal must contain)
WRONG = [
    (Command("wrong backend", ["-m", SERVER, "--model-path", "m", "--attention-backend", "memha_tritn"]),
     ["invalid choice: 'memha_tritn'"]),
    (Command("wrong format", ["-m", SERVER, "--model-path", "m", "--memha-kv-format", "fp8_e5m2"]),
     ["--memha-kv-format", "invalid choice: 'fp8_e5m2'"]),
    (Command("misspelt flag", ["-m", SERVER, "--model-path", "m", "--mem-fraction-statc", "0.8"]),
     ["unrecognized arguments: --mem-fraction-statc"]),
    (Command("bad variable", ["-m", SERVER, "--model-path", "m"], {"MEMHA_KV_FORMAT": "fp7"}),
     ["MEMHA_KV_FORMAT", "'fp7' is not supported"]),
    (Command("bad combination", ["-m", SERVER, "--model-path", "m", "--memha-pipeline"]),
     ["sglang-memha: bad configuration: MEMHA_PIPELINE=1 needs MEMHA_KV_FORMAT"]),
    (Command("router typo", ["-m", ROUTER, "--pd-disagregation"]), ["unrecognized arguments: --pd-disagregation"]),
    (Command("bench typo", ["-m", BENCH[0], "--dataset-name", "sharegptt"]), ["invalid choice: 'sharegptt'"]),
]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """(commands, their parse errors, whether memha_triton was registered): one child process."""
    tmp = tmp_path_factory.mktemp("launch_lines")
    commands = []
    for script in SCRIPTS:
        for ib in ("", "mlx5_0"):  # both branches of the scripts: TCP and RDMA
            commands += script_commands(script, ENV_FILE, str(REPO), {"IB_DEVICE": ib},
                                        SCRIPT_ARGS[os.path.basename(script)])
    commands += doc_commands(DOC, ENV_FILE, str(REPO), DOC_OVERRIDES)
    # The extraction paths can fail too: a wrong flag in a script and in a fenced block.
    bad_script = tmp / "bad.sh"
    bad_script.write_text('exec python -m sglang.launch_server --model-path "$MODEL" --page-sise 16\n')
    bad_doc = tmp / "bad.md"
    bad_doc.write_text('```bash\npython -m sglang_router.launch_router --pd-disaggregation \\\n'
                       '    --prefilll "http://$PREFILL_HOST:$PREFILL_PORT"\n```\n')
    extracted_wrong = (script_commands(str(bad_script), ENV_FILE, str(REPO))
                       + doc_commands(str(bad_doc), ENV_FILE, str(REPO)))
    wrong = [c for c, _ in WRONG] + extracted_wrong
    result = check_commands(commands + wrong, str(REPO))
    n = len(commands)
    return commands, result["errors"][:n], result["errors"][n:], result["plugin_backend_registered"]


def test_plugin_registered_its_backend_in_the_checker(checked):
    assert checked[3], "the checker's load_plugins() did not add memha_triton: the plugin did not load"


def test_launch_scripts_parse(checked):
    commands, errors, _, _ = checked
    rows = [(c, e) for c, e in zip(commands, errors) if c.source.startswith("launch_scripts/")]
    assert len(rows) == 2 * len(SCRIPTS)
    assert [(c.source, e) for c, e in rows if e] == []
    tcp = [c.argv for c, _ in rows if "(IB_DEVICE=)" in c.source and c.program == SERVER]
    rdma = [c.argv for c, _ in rows if "(IB_DEVICE=mlx5_0)" in c.source and c.program == SERVER]
    assert tcp and all("mooncake_tcp" in a and "--disaggregation-ib-device" not in a for a in tcp)
    assert rdma and all("mooncake" in a and a[a.index("--disaggregation-ib-device") + 1] == "mlx5_0" for a in rdma)


def test_deploy_guide_commands_parse(checked):
    commands, errors, _, _ = checked
    rows = [(c, e) for c, e in zip(commands, errors) if c.source.startswith("docs/")]
    assert [(c.source, " ".join(c.argv), e) for c, e in rows if e] == []
    # Every launch line of the guide was extracted, and each ran exactly one program.
    with open(DOC) as f:
        assert len(rows) == len(launch_lines(f.read()))
    programs = {c.program for c, _ in rows}
    assert {SERVER, ROUTER, BENCH[0]} <= programs

    servers = [c.argv for c, _ in rows if c.program == SERVER]
    # both pairings are there: an fnuz prefill and an fn decode, each on memha_triton
    assert any(_has(a, "--disaggregation-mode", "prefill") and _has(a, "--memha-kv-format", "fp8_e4m3fnuz")
               and _has(a, "--attention-backend", "memha_triton") for a in servers)
    assert any(_has(a, "--disaggregation-mode", "decode") and _has(a, "--memha-kv-format", "fp8_e4m3")
               and _has(a, "--attention-backend", "memha_triton") for a in servers)
    assert any(_has(a, "--kv-cache-dtype", "fp8_e4m3") and _has(a, "--attention-backend", "flashinfer")
               for a in servers)
    assert any(_has(a, "--disaggregation-transfer-backend", "mooncake_tcp") for a in servers)


def _has(argv: list[str], flag: str, value: str) -> bool:
    return any(a == flag and argv[i + 1:i + 2] == [value] for i, a in enumerate(argv))


def test_wrong_lines_are_refused_by_the_same_parsers(checked):
    _, _, errors, _ = checked
    for (cmd, words), err in zip(WRONG, errors):
        assert err is not None, f"{cmd.source}: {cmd.argv} was accepted"
        assert all(w in err for w in words), (cmd.source, err)
    script_err, doc_err = errors[len(WRONG):]
    assert script_err and "unrecognized arguments: --page-sise" in script_err
    assert doc_err and "unrecognized arguments: --prefilll" in doc_err


def test_an_unset_variable_fails_extraction(tmp_path):
    doc = tmp_path / "unset.md"
    doc.write_text('```bash\npython -m sglang.launch_server --model-path "$NO_SUCH_VARIABLE"\n```\n')
    with pytest.raises(ValueError, match="NO_SUCH_VARIABLE"):
        doc_commands(str(doc), ENV_FILE, str(REPO))


def test_continuations_are_joined_and_only_launch_lines_kept():
    text = ("```bash\n# a comment\ngrep -c x log\nMEMHA_KV_FORMAT=int8 python -m sglang.launch_server \\\n"
            "    --port 1 \\\n    --page-size 16\n```\noutside: python -m sglang.launch_server\n"
            "```\nlaunch_scripts/gpu_router.sh --max-concurrent-requests 8\n```\n")
    assert launch_lines(text) == [
        (4, "MEMHA_KV_FORMAT=int8 python -m sglang.launch_server --port 1 --page-size 16"),
        (10, "launch_scripts/gpu_router.sh --max-concurrent-requests 8")]


# ---- environment variables ----------------------------------------------------------------------
VAR = re.compile(r"\b(?:MEMHA|SGLANG|MOONCAKE|MC)_[A-Z0-9_]*[A-Z0-9]\b")
VAR_FILES = [DOC, ENV_FILE, *SCRIPTS, str(REPO / "launch_scripts" / "README.md")]


def _sources(root: pathlib.Path):
    for p in root.rglob("*.py"):
        yield p.read_text(errors="replace")


def _read_by(name: str) -> str | None:
    """Which code reads variable ``name`` (None: nothing found)."""
    if name.startswith("MEMHA_"):
        return "sglang_memha" if any(f'"{name}"' in s for s in _sources(REPO / "sglang_memha")) else None
    if name.startswith("MC_"):
        # Mooncake reads its MC_* variables in C++: the name is a NUL-terminated literal in its engine.
        so = pathlib.Path(importlib.util.find_spec("mooncake").submodule_search_locations[0]) / "engine.so"
        found = re.search(rb"(?<![A-Z0-9_])" + name.encode() + rb"\x00", so.read_bytes())
        return "mooncake engine.so" if found else None
    from sglang.srt.environ import envs

    if hasattr(envs, name):
        return "sglang envs"
    import sglang

    root = pathlib.Path(sglang.__file__).parent
    return "sglang source" if any(f'"{name}"' in s for s in _sources(root)) else None


def test_every_named_variable_is_read_by_its_code():
    names = set()
    for path in VAR_FILES:
        with open(path) as f:
            names |= set(VAR.findall(f.read()))
    assert {"MEMHA_KV_FORMAT", "MC_GID_INDEX", "MOONCAKE_PROTOCOL", "SGLANG_HOST_IP"} <= names  # the scan works
    unread = sorted(n for n in names if _read_by(n) is None)
    assert unread == [], f"named in the deploy docs or scripts but read by no code: {unread}"


def test_the_variable_check_can_fail():
    assert _read_by("MEMHA_KV_FORMATS") is None
    assert _read_by("MC_FORCE_TCPX") is None
    assert _read_by("SGLANG_NO_SUCH_SWITCH") is None
