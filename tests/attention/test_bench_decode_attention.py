"""The GPU decode-attention bench (issue 21), dry-run on CPU under Triton's interpreter, and its keys.

The dry run checks what the GPU run depends on: every format's pool is filled with the same K/V
at scattered slots, our kernel on bf16 pages equals SDPA on the dense K/V (fp32 q, within 1e-4),
and the rows name every format plus the SDPA baseline at each shape.
"""

import json
import os
import subprocess
import sys

import pytest

from eval.bench_decode_attention import keys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_on_cpu(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "b.json"
    res = subprocess.run([sys.executable, "eval/bench_decode_attention.py", "--device", "cpu", "--quick",
                          "--out", str(out)], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["max_abs_diff_bf16_vs_sdpa"] < 1e-4
    shapes = {(b, c) for b in (1, 2) for c in (40, 80)}
    for shape in shapes:
        got = sorted(x["format"] for x in r["rows"] if (x["batch"], x["ctx"]) == shape)
        assert got == sorted(["bf16", "fp8_e4m3", "fp8_e4m3fnuz", "int8", "int4_g32", "int4_g64", "dense float32"])
    assert all(x["us"] > 0 and x["kv_bytes"] > 0 for x in r["rows"])
    assert "attn_fp8_vs_bf16_8k" not in r  # the key shape (64 x 8192) was not run


def test_keys_at_the_key_shape():
    row = lambda kernel, fmt, us, nbytes: {"batch": 64, "ctx": 8192, "kernel": kernel, "format": fmt,  # noqa: E731
                                           "us": us, "kv_bytes": nbytes}
    rows = [row("memha", "bf16", 400.0, 2 ** 30), row("memha", "fp8_e4m3", 220.0, 2 ** 29 + 2 ** 25),
            row("sdpa_flash_attention", "dense bfloat16", 380.0, 2 ** 30),
            {**row("memha", "fp8_e4m3", 1.0, 1), "batch": 8}]
    k = keys(rows, copy_gbps=3000.0)
    assert k["attn_fp8_vs_bf16_8k"] == 0.55
    assert k["attn_bf16_vs_sdpa_8k"] == round(400 / 380, 3)
    assert k["attn_fp8_vs_roofline_8k"] == round(220e-6 / ((2 ** 29 + 2 ** 25) / 3000e9), 3)
