"""Golden vectors in sglang_memha/kvformat/golden/*.json reproduce bit-exactly."""

from __future__ import annotations

import pytest
import torch

from sglang_memha.kvformat import FORMAT_VERSION, SIDE_FORMATS, KVFormat, get_codec, side_format
from sglang_memha.kvformat.golden import (
    GOLDEN_DIR, GOLDEN_FORMATS, block_inputs, encode_case, golden_inputs, input_of, load)

from .bounds import max_excess


def test_every_format_has_a_golden_file():
    assert sorted(p.stem for p in GOLDEN_DIR.glob("*.json")) == sorted(f.value for f in GOLDEN_FORMATS)
    assert set(KVFormat) - set(GOLDEN_FORMATS) == {KVFormat.INT4_KIVI_G64}


@pytest.mark.parametrize("fmt", sorted(SIDE_FORMATS), ids=str)
def test_formats_without_a_file_use_covered_codecs(fmt):
    """int4_kivi_g64 has no file: its K codec is int4_kivi's and its V codec int4_g64's (the same
    objects), both of which have files; and int4_kivi.json's role names its V's file."""
    for side in "kv":
        assert side_format(fmt, side) in GOLDEN_FORMATS
        assert get_codec(fmt, role=side) is get_codec(side_format(fmt, side), role=side)
    assert get_codec(KVFormat.INT4_KIVI_G64, role="k") is get_codec(KVFormat.INT4_KIVI, role="k")
    assert get_codec(KVFormat.INT4_KIVI_G64, role="v") is get_codec(KVFormat.INT4_G64)
    assert load(KVFormat.INT4_KIVI)["role"] == "k (V is coded as int4_g32: see int4_g32.json)"


@pytest.mark.parametrize("fmt", GOLDEN_FORMATS, ids=str)
def test_golden_bytes_reproduce(fmt):
    doc = load(fmt)
    assert doc["format"] == fmt.value and doc["format_version"] == FORMAT_VERSION
    assert len(doc["cases"]) >= 9
    for case in doc["cases"]:
        x = input_of(case)
        got = encode_case(fmt, x, case["layer_scale"])
        for key in ("data_hex", "scales_hex", "dequant_fp32_hex"):
            assert got[key] == case[key], f"{fmt.value} case {case['name']}: {key} differs"


@pytest.mark.parametrize("fmt", GOLDEN_FORMATS, ids=str)
def test_golden_decodes_from_stored_bytes(fmt):
    """Decoding the stored bytes (not our own encoding) gives the stored fp32 values."""
    codec = get_codec(fmt, role="k")
    for case in load(fmt)["cases"]:
        t, h, d = case["shape"]
        data = torch.tensor(list(bytes.fromhex(case["data_hex"])), dtype=torch.uint8).reshape(t, h, -1)
        raw = torch.tensor(list(bytes.fromhex(case["scales_hex"])), dtype=torch.uint8)
        if fmt == KVFormat.FP8_E4M3_TENSOR:
            scales = raw.view(torch.float32)
        elif raw.numel():
            scales = codec.scales_from_bytes(raw.reshape(t, h, -1))
        else:
            scales = None
        y = codec.dequantize(data, scales, torch.float32)
        assert bytes(y.view(torch.uint8).reshape(-1).tolist()).hex() == case["dequant_fp32_hex"]


def test_golden_inputs_are_what_the_generator_makes():
    cases = {c["name"]: c for c in load(KVFormat.FP8_E4M3_TENSOR)["cases"]}
    for name, x, _ in golden_inputs():
        assert torch.equal(input_of(cases[name]), x), name


def test_block_inputs_are_what_the_generator_makes():
    cases = {c["name"]: c for c in load(KVFormat.INT4_KIVI)["cases"]}
    assert sorted(cases) == sorted(name for name, _, _ in block_inputs())
    for name, x, _ in block_inputs():
        assert x.shape[0] % 32 == 0 and torch.equal(input_of(cases[name]), x), name


@pytest.mark.parametrize("fmt", [f for f in GOLDEN_FORMATS if f != KVFormat.INT4_KIVI], ids=str)
def test_golden_cases_within_the_doc_bounds(fmt):
    """Every golden case (the edge cases included) meets its format's error bound as
    docs/kv_format.md states it (int8 and fp8 with their fp32 rounding terms, no slack);
    fp8_e4m3_tensor cases that saturate (|x| / layer_scale > 448) have no bound."""
    for case in load(fmt)["cases"]:
        x, ls = input_of(case), case["layer_scale"] or 1.0
        if fmt == KVFormat.FP8_E4M3_TENSOR and float(x.float().abs().max()) / ls > 448:
            continue
        assert max_excess(fmt, x, ls) <= 0, case["name"]
