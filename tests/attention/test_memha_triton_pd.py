"""``--attention-backend memha_triton`` in a real PD deployment on CPU (Triton interpreter).

The GPU code path, run by SGLang itself: registration through SGLang's registry, SGLang's
Triton-backend metadata, our decode kernel over raw quantized pages (with the Hadamard K
rotation applied to q) and the extend path's dequantized prefix scratch (chunked prefill).

Per format (int8 with ``MEMHA_K_TRANSFORM=hadamard``, fp8_e4m3, int4_g64) one prefill (chunks of
64 tokens, no radix cache: every run of a prompt ships the same bytes; memha_triton, or
torch_native for fp8) feeds two decodes: ``torch_native`` (the CPU path, gather + dequantize +
SDPA) and ``memha_triton``. ``--dtype float32`` because the interpreter's bf16 dot is wrong.

Tolerances:
* decodes: the same first token (it comes from the prefill), the same greedy tokens, and
  |logprob difference| <= 1e-3 per step: both read identical bytes and differ only by fp32
  summation order.
* extend: the PD run (its prefill ran memha_triton in chunks) vs a single ``torch_native``
  server with the same format (one chunk): both attend to the stored int8 rows, so the same
  tokens and |logprob difference| <= EXTEND_TOL per step (fp32 summation order). Measured
  2026-12-06: decodes 5e-6 / 5e-6 / 4e-6 (int8, fp8, int4_g64), vs the single server 8e-5 / 5e-6 / 4e-6. A wrong prefix (another layer's K, with
  the chunk's own tokens at full precision) moved the first token's by 0.08.
"""
from __future__ import annotations

import random

import pytest

from sglang_memha.testing import PDCluster, SingleServer
from sglang_memha.testing.procs import http_json
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

# (format, K transform, the prefill's attention backend). The torch_native prefill is the issue's
# "prefill on torch_native, decode on memha_triton"; the memha_triton prefills run the extend path.
CASES = [("int8", "hadamard", "memha_triton"), ("fp8_e4m3", "none", "torch_native"),
         ("int4_g64", "none", "memha_triton")]
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


@pytest.mark.parametrize("fmt, k_transform, prefill_backend", CASES, ids=[f"{f}-{b}-prefill" for f, _, b in CASES])
def test_memha_triton_decode_and_extend_match_torch_native(fmt, k_transform, prefill_backend, tiny_model, tmp_path):
    env = {"MEMHA_KV_FORMAT": fmt, "MEMHA_K_TRANSFORM": k_transform, "TRITON_INTERPRET": "1"}
    prompts = _prompts()
    with SingleServer(tiny_model, BASE, env=env, log_dir=str(tmp_path / "ref")) as s:
        ref = [http_json(f"{s.url}/generate", _payload(p), timeout=300) for p in prompts]
    prefill = [*BASE, "--attention-backend", prefill_backend, "--chunked-prefill-size", "64", "--disable-radix-cache"]
    with PDCluster(tiny_model, prefill, BASE, env=env, extra_decode_envs=[{}], extra_decode_args=[MEMHA_TRITON],
                   log_dir=str(tmp_path / "pd")) as c:
        native = [c.direct_generate(_payload(p), decode_index=0) for p in prompts]
        triton = [c.direct_generate(_payload(p), decode_index=1) for p in prompts]
        logs = c.logs()
    assert descendants() == []
    line = f"memha_triton reads {fmt} pages in the kernel (k_transform={k_transform}"
    assert line in logs["decode1"] and (line in logs["prefill"]) == (prefill_backend == "memha_triton")
    assert "memha_triton reads" not in logs["decode"]  # decode 0 runs torch_native
    worst_decode = worst_ref = 0.0
    for r, a, b in zip(ref, native, triton):
        sr, sa, sb = _steps(r), _steps(a), _steps(b)
        assert [t for _, t in sr] == [t for _, t in sa] == [t for _, t in sb]
        worst_decode = max(worst_decode, *(abs(x - y) for (x, _), (y, _) in zip(sa, sb)))
        worst_ref = max(worst_ref, *(abs(x - y) for (x, _), (y, _) in zip(sr, sb)))
    print(f"{fmt}: memha_triton vs torch_native: decodes on the same bytes max|dlogp| {worst_decode:.2e}; "
          f"PD (chunked {prefill_backend} prefill) vs a single torch_native server {worst_ref:.2e}")
    assert worst_decode <= DECODE_TOL and worst_ref <= EXTEND_TOL, (worst_decode, worst_ref)
