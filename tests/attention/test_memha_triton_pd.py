"""``--attention-backend memha_triton`` in a real PD deployment on CPU (Triton interpreter).

The GPU code path, run by SGLang itself: registration through SGLang's registry, SGLang's
Triton-backend metadata, our decode kernel over raw quantized pages (with the Hadamard K
rotation applied to q) and the extend path's dequantized prefix scratch (chunked prefill).

One prefill (memha_triton, chunks of 64 tokens, no radix cache: every run of a prompt ships the
same bytes) feeds two decodes: ``torch_native`` (the CPU path, gather + dequantize + SDPA) and
``memha_triton``. Formats: int8 with ``MEMHA_K_TRANSFORM=hadamard``. ``--dtype float32`` because
the interpreter's bf16 dot is wrong.

Tolerances:
* decodes: the same first token (it comes from the prefill), the same greedy tokens, and
  |logprob difference| <= 1e-3 per step: both read identical bytes and differ only by fp32
  summation order.
* extend: the PD run (its prefill ran memha_triton in chunks) vs a single ``torch_native``
  server with the same format (one chunk): both attend to the stored int8 rows, so the same
  tokens and |logprob difference| <= EXTEND_TOL per step (fp32 summation order). Measured
  2026-12-06: 5e-6 (decodes) and 8e-5 (vs the single server). A wrong prefix (another layer's K, with
  the chunk's own tokens at full precision) moved the first token's by 0.08.
"""
from __future__ import annotations

import random

import pytest

from sglang_memha.testing import PDCluster, SingleServer
from sglang_memha.testing.procs import http_json
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

ENV = {"MEMHA_KV_FORMAT": "int8", "MEMHA_K_TRANSFORM": "hadamard", "TRITON_INTERPRET": "1"}
BASE = ["--page-size", "16", "--dtype", "float32"]
MEMHA_TRITON = ["--attention-backend", "memha_triton"]
STEPS = 8
DECODE_TOL = 1e-3
EXTEND_TOL = 1e-3


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, 2000) for _ in range(n)] for n in (150, 40, 17)]  # 150: three chunks


def _payload(ids: list[int]) -> dict:
    return {"input_ids": ids, "return_logprob": True,
            "sampling_params": {"max_new_tokens": STEPS, "temperature": 0, "ignore_eos": True}}


def _steps(status_body) -> list[tuple[float, int]]:
    status, body = status_body
    assert status == 200, body
    return [(lp, tok) for lp, tok, _ in body["meta_info"]["output_token_logprobs"]]


def test_memha_triton_decode_and_extend_match_torch_native(tiny_model, tmp_path):
    prompts = _prompts()
    with SingleServer(tiny_model, BASE, env=ENV, log_dir=str(tmp_path / "ref")) as s:
        ref = [http_json(f"{s.url}/generate", _payload(p), timeout=300) for p in prompts]
    prefill = [*BASE, *MEMHA_TRITON, "--chunked-prefill-size", "64", "--disable-radix-cache"]
    with PDCluster(tiny_model, prefill, BASE, env=ENV, extra_decode_envs=[{}], extra_decode_args=[MEMHA_TRITON],
                   log_dir=str(tmp_path / "pd")) as c:
        native = [c.direct_generate(_payload(p), decode_index=0) for p in prompts]
        triton = [c.direct_generate(_payload(p), decode_index=1) for p in prompts]
        logs = c.logs()
    assert descendants() == []
    assert "memha_triton reads int8 pages" in logs["prefill"] and "memha_triton reads int8 pages" in logs["decode1"]
    assert "memha_triton reads" not in logs["decode"]  # decode 0 runs torch_native
    worst_decode = worst_ref = 0.0
    for r, a, b in zip(ref, native, triton):
        sr, sa, sb = _steps(r), _steps(a), _steps(b)
        assert [t for _, t in sr] == [t for _, t in sa] == [t for _, t in sb]
        worst_decode = max(worst_decode, *(abs(x - y) for (x, _), (y, _) in zip(sa, sb)))
        worst_ref = max(worst_ref, *(abs(x - y) for (x, _), (y, _) in zip(sr, sb)))
    print(f"memha_triton vs torch_native: decodes on the same bytes max|dlogp| {worst_decode:.2e}; "
          f"PD (chunked memha_triton prefill) vs a single torch_native server {worst_ref:.2e}")
    assert worst_decode <= DECODE_TOL and worst_ref <= EXTEND_TOL, (worst_decode, worst_ref)
