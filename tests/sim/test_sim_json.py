"""sim.json's sim_repeat_* keys come from a named command: ``validate --harness-file F --write --repeat``."""

import json
from pathlib import Path

import pytest

from eval.sim import validate
from eval.sim.__main__ import _repeat_keys, main

ROOT = Path(__file__).resolve().parents[2]
REPEAT_FILE = "eval/results/sim_cpu_pd_measured_repeat.json"


def test_repeat_keys_hand():
    v = {"source": "harness", "rows": [{"x": 1}], "fit": {"g": 2.0}, "sim_max_rel_error": 0.1,
         "sim_validation_points": 9}
    assert _repeat_keys(v, "f.json") == {"sim_repeat_max_rel_error": 0.1, "sim_repeat_validation_points": 9,
                                         "sim_repeat_fit": {"g": 2.0}, "sim_repeat_validation_rows": [{"x": 1}],
                                         "sim_repeat_file": "f.json"}


def test_repeat_needs_write_and_a_harness_file():
    with pytest.raises(SystemExit, match="--repeat needs"):
        main(["validate", "--repeat", "--write"])


def test_committed_repeat_keys_are_what_the_command_makes():
    sim = json.loads((ROOT / "eval" / "results" / "sim.json").read_text())
    made = _repeat_keys(validate.run("harness", ROOT / REPEAT_FILE), REPEAT_FILE)
    assert sorted(k for k in sim if k.startswith("sim_repeat_")) == sorted(made)
    for k, v in made.items():
        if isinstance(v, float):
            assert sim[k] == pytest.approx(v, rel=1e-9), k
    assert sim["sim_repeat_file"] == REPEAT_FILE
    assert [r["predicted_s"] for r in sim["sim_repeat_validation_rows"]] == pytest.approx(
        [r["predicted_s"] for r in made["sim_repeat_validation_rows"]], rel=1e-9)
