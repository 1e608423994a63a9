"""Golden test vectors: input values -> exact page bytes, one JSON file per format.

Files live in ``golden/<format>.json``. Each case holds the input as raw little-endian bytes
(``input_hex``, in ``input_dtype``) and as decimals (``input``), and the expected ``data_hex``,
``scales_hex`` (the companion-buffer row bytes, or the fp32 layer scale for fp8_e4m3_tensor) and
``dequant_fp32_hex``. Another implementation checks itself by decoding ``input_hex``, encoding,
and comparing bytes. Regenerate (only when FORMAT_VERSION changes) with
``python -m sglang_memha.kvformat.golden``; tests fail if the code and the files disagree.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sglang_memha.kvformat.base import get_codec
from sglang_memha.kvformat.spec import FORMAT_VERSION, KVFormat, format_spec

GOLDEN_DIR = Path(__file__).with_name("golden")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def worked_example() -> torch.Tensor:
    """[1, 1, 64] fp32: the vector used in docs/kv_format.md."""
    v = [0.0, 0.5, -1.25, 3.0, -0.001, 7.5, 100.0, -2.0] + [0.25 * (i - 28) for i in range(56)]
    return torch.tensor(v, dtype=torch.float32).reshape(1, 1, 64)


def golden_inputs() -> list[tuple[str, torch.Tensor, float | None]]:
    """(name, x [T, H, 64], layer_scale) cases; all deterministic."""
    g = torch.Generator().manual_seed(20250101)
    d = 64
    zeros = torch.zeros(2, 2, d)
    zeros[1, 0, ::2] = -0.0
    zeros[1, 1, 5] = 1.0  # one non-zero value among zeros
    ramp = torch.linspace(-4.0, 4.0, 2 * 2 * d).reshape(2, 2, d)
    normal = torch.randn(3, 2, d, generator=g)
    heavy = _student_t(g, (3, 2, d))
    outlier = torch.randn(2, 2, d, generator=g) * 0.1
    outlier[:, :, 7] = 60.0
    outlier[:, 1, 40] = -250.0
    tiny = torch.randn(2, 2, d, generator=g) * 1e-5
    tiny[0, 0, 0] = 1.0
    ties = (torch.arange(2 * 2 * d, dtype=torch.float32).reshape(2, 2, d) % 17 - 8) * 0.5
    return [
        ("worked_example", worked_example(), None),
        ("zeros_and_negative_zero", zeros, None),
        ("ramp", ramp, None),
        ("normal", normal, None),
        ("heavy_tailed_t2", heavy, None),
        ("outlier_channels", outlier, None),
        ("tiny_with_one_large", tiny, None),
        ("half_integer_ties", ties, None),
        ("normal_bf16", normal.to(torch.bfloat16), None),
        ("normal_bf16_layer_scale_0.05", (normal * 8).to(torch.bfloat16), 0.05),
    ]


def worked_input(fmt: KVFormat) -> torch.Tensor:
    """The doc's worked-example input for ``fmt``: ``worked_example()``, or for a block-coded
    format one block of 32 tokens, token t = worked_example() * (t + 1) / 32 (token 31 is it)."""
    x = worked_example()
    if format_spec(fmt).token_local:
        return x
    block = format_spec(fmt).group_size
    return x * (torch.arange(1, block + 1, dtype=torch.float32) / block).reshape(block, 1, 1)


def block_inputs() -> list[tuple[str, torch.Tensor, float | None]]:
    """(name, x [T, H, 64], None) cases for block-coded formats (T a multiple of 32): the same
    kinds as ``golden_inputs``, a block long. Their own generator, so the token-local cases
    (and their files) stay as they were."""
    g = torch.Generator().manual_seed(20261205)
    t, d = 32, 64
    zeros = torch.zeros(t, 1, d)
    zeros[::2, 0, ::2] = -0.0
    zeros[5, 0, 9] = 1.0  # one non-zero value among zeros
    ramp = torch.linspace(-4.0, 4.0, t * d).reshape(t, 1, d)
    normal = torch.randn(t, 2, d, generator=g)  # two heads: the row order is (token, head)
    heavy = _student_t(g, (t, 1, d))
    outlier = torch.randn(t, 1, d, generator=g) * 0.1
    outlier[:, :, 7] += 60.0  # a channel with a large offset (what per-channel K groups are for)
    outlier[3, 0, 40] = -250.0  # one large value
    tiny = torch.randn(t, 1, d, generator=g) * 1e-5
    tiny[0, 0, 0] = 1.0
    ties = (torch.arange(t * d, dtype=torch.float32).reshape(t, 1, d) % 17 - 8) * 0.5
    two_blocks = torch.randn(2 * t, 1, d, generator=g) * torch.linspace(0.1, 10.0, 2 * t).reshape(-1, 1, 1)
    return [
        ("worked_example", worked_input(KVFormat.INT4_KIVI), None),
        ("zeros_and_negative_zero", zeros, None),
        ("ramp", ramp, None),
        ("normal_two_heads", normal, None),
        ("two_blocks_growing", two_blocks, None),
        ("heavy_tailed_t2", heavy, None),
        ("outlier_channels", outlier, None),
        ("tiny_with_one_large", tiny, None),
        ("half_integer_ties", ties, None),
        ("normal_bf16", normal.to(torch.bfloat16), None),
    ]


def _student_t(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Student-t (2 dof) from normals: z / sqrt(chi2_2 / 2); deterministic with g.

    The log runs in float64 and the result is rounded to float32 once: torch's float32 log
    differs by 1 ulp between CPUs' vector paths (seen between two CI machines), float64's
    error is far below float32's rounding step, so every machine makes the same inputs."""
    z = torch.randn(shape, generator=g)
    u = torch.rand(shape, generator=g).clamp_min(1e-7)
    chi2 = -2.0 * torch.log(u.double())  # chi-square with 2 dof
    return (z.double() / torch.sqrt(chi2 / 2)).float()


def _hex(t: torch.Tensor) -> str:
    return bytes(t.contiguous().view(torch.uint8).reshape(-1).tolist()).hex()


def encode_case(fmt: KVFormat, x: torch.Tensor, layer_scale: float | None) -> dict:
    codec = get_codec(fmt, role="k")  # K's codec (V's differs only for int4_kivi: int4_g32's)
    if fmt == KVFormat.FP8_E4M3_TENSOR:
        data, scales = codec.quantize(x, 1.0 if layer_scale is None else layer_scale)
        scale_raw = scales
    else:
        data, scales = codec.quantize(x)
        scale_raw = codec.scale_bytes(scales)
    deq = codec.dequantize(data, scales, torch.float32)
    return {
        "data_hex": _hex(data),
        "scales_hex": "" if scale_raw is None else _hex(scale_raw),
        "dequant_fp32_hex": _hex(deq),
    }


def generate(fmt: KVFormat) -> dict:
    cases = []
    for name, x, layer_scale in golden_inputs() if format_spec(fmt).token_local else block_inputs():
        if fmt != KVFormat.FP8_E4M3_TENSOR and layer_scale is not None:
            continue
        case = {
            "name": name,
            "input_dtype": str(x.dtype).removeprefix("torch."),
            "shape": list(x.shape),
            "layer_scale": layer_scale,
            # decimals for the worked example only; input_hex is the normative input
            "input": x.float().reshape(-1).tolist() if name == "worked_example" else None,
            "input_hex": _hex(x),
        }
        case.update(encode_case(fmt, x, layer_scale))
        cases.append(case)
    doc = {"format": fmt.value, "format_version": FORMAT_VERSION, "layout": "NHD", "cases": cases}
    if not format_spec(fmt).token_local:
        doc["role"] = "k (V is coded as int4_g32: see int4_g32.json)"
    return doc


def load(fmt: KVFormat) -> dict:
    return json.loads((GOLDEN_DIR / f"{KVFormat.parse(fmt).value}.json").read_text())


def input_of(case: dict) -> torch.Tensor:
    raw = bytearray.fromhex(case["input_hex"])
    t = torch.frombuffer(raw, dtype=torch.uint8).clone().view(_DTYPES[case["input_dtype"]])
    return t.reshape(case["shape"])


def main() -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    for fmt in KVFormat:
        path = GOLDEN_DIR / f"{fmt.value}.json"
        path.write_text(json.dumps(generate(fmt), indent=1) + "\n")
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
