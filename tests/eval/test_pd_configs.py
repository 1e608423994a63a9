"""The shared PD configuration table and the issue-5 link rule."""
import pytest

from eval.pd_configs import BF16_BYTES_PER_TOKEN, PD_CONFIGS, matched_link_rate, recorded_link_rate, thread_env


def test_link_rule_hand_computed():
    # bf16 KV of 4096 tokens = 23040 B/token * 4096 = 94.37 MB = 754.97 Mbit; over 14.42 s -> 52.4 Mbit/s
    assert BF16_BYTES_PER_TOKEN == 23040
    assert matched_link_rate(14.42) == "52mbit"
    assert matched_link_rate(1.0, ref_tokens=1024) == "189mbit"
    with pytest.raises(ValueError):
        matched_link_rate(0)


def test_configs_differ_only_in_memha_env():
    assert PD_CONFIGS["stock_bf16"].env == {} and PD_CONFIGS["stock_bf16"].decode_env == {}
    for name, cfg in PD_CONFIGS.items():
        assert all(k.startswith("MEMHA_") for k in {**cfg.env, **cfg.decode_env}), name
    assert PD_CONFIGS["memha_fp8_pipelined_eager"].decode_env == {"MEMHA_DECODE_DEQUANT": "eager"}
    assert PD_CONFIGS["memha_int4_pipelined"].env["MEMHA_KV_FORMAT"] == "int4_g64"


def test_thread_env_and_recorded_rate(tmp_path):
    assert thread_env(1) == {"OMP_NUM_THREADS": "1"} and thread_env(0) == {}
    (tmp_path / "t.json").write_text('{"link_rate": "40mbit"}')
    assert recorded_link_rate(str(tmp_path / "t.json")) == "40mbit"
    with pytest.raises(ValueError, match="--rate"):
        recorded_link_rate(str(tmp_path / "missing.json"))


def test_compute_dtype_flags_reach_the_goodput_cluster_and_its_settings():
    """--compute-dtype float32: both servers compute in fp32 with a bf16 KV cache, every config
    gets the slow-link Mooncake limit, and runs that differ in it (a missing key = the model's
    dtype, as before the key existed) are not merged."""
    from eval.goodput import report, runner
    from eval.pd_configs import SLOW_LINK_ENV, compute_args

    assert compute_args("model") == []
    assert compute_args("float32") == ["--dtype", "float32", "--kv-cache-dtype", "bfloat16"]
    with pytest.raises(ValueError, match="compute dtype 'bf16'"):
        compute_args("bf16")
    c = runner.start_cluster("memha_fp8_pipelined", "/nonexistent-model", None, 512, 1, 1, "/tmp/x", "float32")
    assert c.prefill_args[-4:] == c.decode_args[-4:] == compute_args("float32")
    assert c.env["MC_TRANSFER_TIMEOUT"] == SLOW_LINK_ENV["MC_TRANSFER_TIMEOUT"] and c.env["MEMHA_KV_FORMAT"] == "fp8_e4m3"
    assert report.differing_setting({}, {"compute_dtype": "model"}) is None
    assert report.differing_setting({}, {"compute_dtype": "float32"}) == "compute_dtype"
