"""The demo's tokens-per-GiB line (``launch_scripts/demo_cpu.py:capacity_report``), on pool lines in
the exact format ``quant_pool.py`` writes, without starting servers."""
from __future__ import annotations

import importlib.util
import json
import pathlib

from sglang_memha.kvformat import kv_bytes_per_token

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("demo_cpu", REPO / "launch_scripts" / "demo_cpu.py")
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def _pool_line(fmt: str, per_token: int, layers=30, heads=3, head_dim=64, tokens=4096) -> str:
    # the format string of quant_pool.MemhaQuantKVPool's start-up warning
    return ("[2026-01-01 00:00:00] sglang-memha KV pool: format=%s k_transform=none k_offset=none tokens=%d "
            "page_size=16 layers=%d kv_heads=%d head_dim=%d bytes_per_token=%d (bf16 would be %d)"
            % (fmt, tokens, layers, heads, head_dim, per_token, 2 * layers * heads * head_dim * 2))


def test_fp8_smollm2_geometry():
    per_token = 30 * kv_bytes_per_token("fp8_e4m3", 3, 64)
    assert per_token == 11_880  # 30 layers x 3 heads x 2 (K, V) x (64 code bytes + 2 scale bytes)
    text = demo.capacity_report(_pool_line("fp8_e4m3", per_token), "unused", 4096)
    assert "11,880 B per token" in text and f"{(1 << 30) // 11_880:,} tokens per GiB" in text
    assert "23,040 B" in text and "46,603 tokens per GiB" in text and "1.94x the tokens" in text
    assert "holds 4,096 tokens" in text


def test_int4_g64_ratio():
    per_token = 30 * kv_bytes_per_token("int4_g64", 3, 64)
    assert "3.56x the tokens" in demo.capacity_report(_pool_line("int4_g64", per_token), "unused", None)


def test_a_pool_line_that_disagrees_with_the_geometry_is_reported():
    text = demo.capacity_report(_pool_line("fp8_e4m3", 11_000), "unused", 4096)
    assert "a bug" in text and "11,880" in text and "tokens per GiB" not in text


def test_stock_decode_reads_the_model_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}))
    text = demo.capacity_report("no pool line here", str(tmp_path), 4096)
    assert "SGLang's own bf16 pool, 23,040 B per token -> 46,603 tokens per GiB" in text
