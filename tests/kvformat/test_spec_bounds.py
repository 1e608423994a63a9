"""The error bounds docs/kv_format.md states, with their fp32 rounding terms and no slack
(``bounds.max_excess``), hold on random rows of every magnitude, fp32 subnormals included; and the
int8 bound needs its rounding term (a golden case exceeds ``scale / 2`` alone)."""

from __future__ import annotations

import pytest
import torch

from sglang_memha.kvformat import KVFormat, get_codec
from sglang_memha.kvformat.golden import input_of, load

from .bounds import max_excess

FORMATS = [KVFormat.BF16, KVFormat.FP8_E4M3, KVFormat.FP8_E4M3FNUZ, KVFormat.INT8, KVFormat.INT4_G32,
           KVFormat.INT4_G64, KVFormat.BFP8]


def rows_of_every_magnitude(seed: int, dtype: torch.dtype) -> torch.Tensor:
    """[64, 4, 64]: normal rows scaled by 2^e, e from -150 to 50 (fp32 subnormal rows at the low end),
    some with an outlier channel, some with a constant offset."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 4, 64, generator=g, dtype=torch.float64)
    x[::3, :, 5] *= 100.0
    x[1::4] += 3.0
    e = torch.linspace(-150, 50, 64, dtype=torch.float64).round()
    x = x * torch.pow(2.0, e).reshape(-1, 1, 1)
    return x.to(dtype)


@pytest.mark.parametrize("fmt", FORMATS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stated_bounds_hold_at_every_magnitude(fmt, dtype, seed):
    x = rows_of_every_magnitude(seed, dtype)
    assert max_excess(fmt, x) <= 0


def test_int8_half_step_alone_is_exceeded_by_a_golden_case():
    """The doc cites golden case normal_bf16: x = -0.9765625 is off by scale / 2 + 2^-27."""
    case = {c["name"]: c for c in load(KVFormat.INT8)["cases"]}["normal_bf16"]
    x = input_of(case)
    codec = get_codec(KVFormat.INT8)
    data, scale = codec.quantize(x)
    excess = (codec.dequantize(data, scale, torch.float32) - x.float()).abs() - scale / 2
    i = int(excess.argmax())
    assert float(excess.reshape(-1)[i]) == 2.0**-27 and float(x.reshape(-1)[i]) == -0.9765625
    assert max_excess(KVFormat.INT8, x) <= 0  # within scale / 2 + |x| 2^-22
