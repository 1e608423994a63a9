"""Golden test vectors: input values -> exact page bytes, one JSON file per format.

Files live in ``golden/<format>.json``; docs/kv_format.md ("Golden vectors") specifies the
container. Each case holds the input as raw little-endian bytes (``input_hex``, in ``input_dtype``,
row-major ``shape`` = [T, H, D]) and, for the worked example, as decimals (``input``), and the
expected ``data_hex`` (the T x H data rows, as a pool's data buffer holds them at slots 0..T-1),
``scales_hex`` (the T x H scale rows of the scale buffer; for fp8_e4m3_tensor the fp32 layer scale
it divided by; empty for bf16) and ``dequant_fp32_hex``. Another implementation checks itself by
decoding ``input_hex``, encoding, and comparing bytes. Regenerate with
``python -m sglang_memha.kvformat.golden`` when FORMAT_VERSION changes or cases are added (a case's
bytes never change within a version); tests fail if the code and the files disagree.
``int4_kivi_g64`` has no file of its own: its K is int4_kivi's (``int4_kivi.json``) and its V
int4_g64's (``int4_g64.json``), byte for byte (``GOLDEN_FORMATS``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sglang_memha.kvformat.base import get_codec
from sglang_memha.kvformat.spec import FORMAT_VERSION, KVFormat, format_spec, side_format

GOLDEN_DIR = Path(__file__).with_name("golden")
# Formats with a golden file: those whose K rows are their own format's. The others
# (int4_kivi_g64) code K and V with codecs those files cover (``spec.SIDE_FORMATS``).
GOLDEN_FORMATS: tuple[KVFormat, ...] = tuple(f for f in KVFormat if side_format(f, "k") == f)
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
    ] + edge_inputs()


def _row(values: list[float], d: int = 64) -> list[float]:
    """values padded with +0 to d elements."""
    assert len(values) <= d, len(values)
    return values + [0.0] * (d - len(values))


def _blocks(blocks: list[list[float]], size: int = 16) -> list[float]:
    """A row made of ``size``-element blocks, each padded with +0."""
    return [v for b in blocks for v in _row(b, size)]


def _t(rows: list[list[float]], dtype: torch.dtype = torch.float32, heads: int = 1) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64).to(dtype).reshape(len(rows) // heads, heads, -1)


def _pm(values: list[float]) -> list[float]:
    """values and their negatives."""
    return values + [-v for v in values]


def edge_inputs() -> list[tuple[str, torch.Tensor, float | None]]:
    """Cases that pin down each choice docs/kv_format.md makes (added in format v4). No random
    draws, so the cases before them are unchanged; ``tests/kvformat/test_spec_edges.py`` checks
    that each one tells the rule the doc states from the alternative it names."""
    h = float.fromhex
    below = 1 - 2.0**-24  # the fp32 just below 1: 2^k * below is the fp32 just below 2^k
    sub = 2.0**-149  # fp32's smallest subnormal
    return [
        # fp8: RNE ties at s = 1 (amax 448), r = 1: 232 -> 224, 100 -> 96, 8.5 -> 8, 9.5 -> 10, subnormal
        # ties 2^-10 -> 0, 3 * 2^-10 -> 2^-8; -2^-11 rounds to -0, written 0x00 (fp8_e4m3_tensor: 0x80)
        ("fp8_ties_unit_scale", _t([_row([448.0] + _pm([440.0, 232.0, 100.0, 17.0, 19.0, 9.5, 8.5, 1.0625,
                                                        1.1875, 0.53125, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-10,
                                                        15 * 2.0**-10, 2.0**-11]) + [-0.0])]), None),
        # fp8: RNE(fp32(x * fp32(1 / s))) differs from RNE(x / s) for these (s = bf16_up(3 / 448),
        # bf16_up(10 / 448)): x * r lands on a midpoint (ties to even) or just below one
        ("fp8_reciprocal_not_quotient", _t([
            _row([3.0] + _pm([h("0x1.aa4p0") * 2.0**k for k in range(-12, 1)])
                 + [h("0x1.d38002p0") * 2.0**k for k in range(-12, 1)]),
            _row([10.0] + [h("0x1.84e002p0") * 2.0**k for k in range(-12, 3)]
                 + _pm([h("0x1.e06002p0") * 2.0**k for k in range(-12, 3)]))]), None),
        # int8: x / scale exactly k + 0.5 (scale = 127 / 127 = 1, 381 / 127 = 3): RNE, ties to even
        ("int8_ties", _t([[127.0, -127.0] + [k + 0.5 for k in range(-31, 31)],
                          [381.0, -381.0] + [(k + 0.5) * 3 for k in range(-31, 31)]]), None),
        # int4: min_b = 0 / -8, scale_b = 1 in every group: (x - min_b) / scale_b = k + 0.5 ties to even
        ("int4_ties", _t([2 * ([0.0, 15.0] + [k + 0.5 for k in range(15)] + [float(k) for k in range(15)]),
                          2 * ([-8.0, 7.0] + [k - 7.5 for k in range(15)] + [float(k - 7) for k in range(15)])],
                         heads=2), None),
        # fp8_e4m3_tensor (layer scale 1): beyond 448 every value saturates to 448 (0x7e / 0xfe)
        ("saturation_above_448", _t([_row(_pm([448.0, 449.0, 463.9, 464.0, 472.0, 479.9, 480.0, 500.0, 1000.0,
                                               65504.0, 1e6, 2.0**40, 2.0**64]) + [1.0, 0.5, -0.25])]), None),
        ("saturation_bf16_layer_scale_0.25", _t([_row(_pm([112.0, 116.0, 120.0, 124.0, 128.0, 1000.0, 2.0**20,
                                                           2.0**64, 111.5, 1.0, 0.5]))], torch.bfloat16), 0.25),
        # x / 0.001 overflows fp16 to inf for the largest values, then clamps to 448
        ("saturation_fp16_layer_scale_0.001", _t([_row(_pm([65504.0, 60000.0, 1000.0, 1.0, 0.5, 0.4478, 0.44,
                                                            0.001]))], torch.float16), 0.001),
        # fp8_e4m3_tensor, bf16 input: the fp32 quotient is rounded to bf16 before the fp8 RNE, which
        # changes the code of each of these (a single rounding would give the other neighbour)
        ("tensor_bf16_quotient_rounded_0.3", _t([_row(_pm(
            [h("0x1.2p-8")] + [h(m) * 2.0**k for k in range(-8, 7) for m in ("0x1.6cp0", "0x1.94p0")]))],
            torch.bfloat16), 0.3),
        # fp8_e4m3_tensor, fp32 input: x / fp32(0.3) (a division); x * fp32(1 / 0.3) gives other codes
        ("tensor_fp32_division_0.3", _t([_row(_pm(
            [h("0x1.800002p-10"), h("0x1.a66666p-9"), h("0x1.2p-8")]
            + [h("0x1.e00002p0") * 2.0**k for k in range(-8, 7)] + [135.0, 200.0, 1000.0]))]), 0.3),
        # bfp8: block maxima just below a power of two (an fp32 log2 rounds them up to it), at a power of
        # two, and at 127.5 / 128 (mag RNE(127.5) = 128 saturates to 127)
        ("bfp8_below_powers_of_two", _t([
            _blocks([[below, 0.5, 0.25 * below, -below, 0.75, 0.3, -0.1],
                     [1.0, below, 0.5 * below, -0.75, 2.0**-7 * 1.5],
                     [2.0**-20 * below, -(2.0**-21), 2.0**-22 * 3, 2.0**-20 * below * -0.5],
                     [2.0**40 * below, 2.0**39, -(2.0**38) * 3, 12345.0]]),
            _blocks([[127.5 / 128, 126.5 / 128, -125.5 / 128, 0.5 / 128, 1.5 / 128],
                     [2.0 * below, -1.0, 1.5, 2.0**-6],
                     [-(2.0**-4) * below, 2.0**-5, 3 * 2.0**-7],
                     [2.0**63 * below, -(2.0**62), 2.0**56, 1.0]])]), None),
        # bfp8: exponent bytes 1 (amax 2^-126; 2^(133 - 1) is not an fp32) and 0 (subnormal amax: the
        # largest one saturates to 127), fp32 subnormals, a block whose only values are +-2^-149 (mag 0)
        ("bfp8_tiny_exponents", _t([_blocks([
            [2.0**-126, 2.0**-127, 2.0**-133, 3 * 2.0**-133, 5 * 2.0**-133, -(2.0**-130), sub],
            [2.0**-126 - sub, 2.0**-140, -(2.0**-127), 2.0**-128 * 3],
            [1.5 * 2.0**-130, 2.0**-134, 3 * 2.0**-134, sub, -(2.0**-133)],
            [sub, -sub]])]), None),
        # all-zero blocks and rows of +0, -0 and both: exponent byte 0, int8 scale +0, int4 (+0, +0)
        ("zero_blocks", _t([_blocks([[0.0] * 16, [-0.0] * 16, [0.0, -0.0] * 8, [1.0, -0.0, -0.001]]),
                            [-0.0] * 64]), None),
        # negative values whose code rounds to zero: written +0 by every encoder but bf16 (0x8000)
        # and fp8_e4m3_tensor (0x80)
        ("negative_rounding_to_zero", _t([_blocks([
            [448.0, -(2.0**-11), -(2.0**-12), -1e-30, -1.0, -1.7, -0.0],
            [1.0, -1e-41, -(2.0**-134), -(2.0**-9)],
            [2.0, -(2.0**-8), -0.0],
            [-(2.0**-120), -(2.0**-130)]])]), None),
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
        ("int4_ties_per_channel", _kivi_ties(), None),
    ]


def _kivi_ties() -> torch.Tensor:
    """[32, 1, 64]: over its 32 tokens every channel holds its min and max (0 and 15, or -8 and 7 on
    odd channels: scale_b = 1) and 15 half-integers, so (x - min_b) / scale_b = k + 0.5 ties to even."""
    col = torch.tensor([0.0, 15.0] + [k + 0.5 for k in range(15)] + [float(k) for k in range(15)])
    shift = torch.tensor([0.0, 8.0]).repeat(32)
    return (col[:, None] - shift[None, :]).reshape(32, 1, 64)


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
    codec = get_codec(fmt, role="k")  # K's codec (V's differs only for SIDE_FORMATS)
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
        v = side_format(fmt, "v").value
        doc["role"] = f"k (V is coded as {v}: see {v}.json)"
    return doc


def load(fmt: KVFormat) -> dict:
    return json.loads((GOLDEN_DIR / f"{KVFormat.parse(fmt).value}.json").read_text())


def input_of(case: dict) -> torch.Tensor:
    raw = bytearray.fromhex(case["input_hex"])
    t = torch.frombuffer(raw, dtype=torch.uint8).clone().view(_DTYPES[case["input_dtype"]])
    return t.reshape(case["shape"])


def main() -> None:
    GOLDEN_DIR.mkdir(exist_ok=True)
    for fmt in GOLDEN_FORMATS:
        path = GOLDEN_DIR / f"{fmt.value}.json"
        path.write_text(json.dumps(generate(fmt), indent=1) + "\n")
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
