"""eval/bench_ttft.effect_keys: each effect is a ratio of medians of two configurations measured on
the same link, with the widest range two unpaired requests allow. Exact values on made-up samples."""
from __future__ import annotations

import pytest

pytest.importorskip("sglang")
from eval.bench_ttft import EFFECTS, effect_keys  # noqa: E402


def test_effects_are_ratios_of_medians_with_unpaired_ranges():
    samples = {"memha_fp8_pipelined": {4096: [2.0, 3.0, 4.0]}, "memha_fp8_whole": {4096: [5.0, 6.0, 8.0]},
               "stock_bf16": {4096: [10.0, 12.0, 11.0], 256: [1.0]}}
    out = effect_keys(samples)
    assert out["ttft_pipelined_vs_whole_4096"] == 0.5            # 3 / 6
    assert out["ttft_pipelined_vs_whole_4096_range"] == [0.25, 0.8]  # 2/8, 4/5
    assert out["ttft_ratio_4096"] == pytest.approx(3 / 11, abs=1e-4)
    assert out["ttft_ratio_4096_range"] == [round(2 / 12, 4), 0.4]
    # configurations not measured give no key (bf16 whole, prefill only), and no length that
    # only one side has (256)
    assert not any(k.startswith(("ttft_bytes", "ttft_pipelined_vs_whole_bf16", "ttft_floor")) for k in out)
    assert "ttft_ratio_256" not in out


def test_every_effect_names_configurations_the_bench_runs():
    from eval.bench_ttft import CONFIGS
    for num, den in EFFECTS.values():
        assert {num, den} <= {*CONFIGS, "prefill_only"}
