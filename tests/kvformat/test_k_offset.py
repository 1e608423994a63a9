"""Static K offset file (``kvformat/k_offset.py``) and its descriptor field.

References: exact values (a save/load round trip keeps the bf16-rounded tensor bit for bit), the
digest's definition, and the error texts an operator needs (the variable, the file, the fix).
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from sglang_memha.kvformat import FormatDescriptor, FormatMismatchError, k_offset

L, H, D = 4, 2, 64


def _values(seed=0):
    return torch.randn(L, H, D, generator=torch.Generator().manual_seed(seed)) * 5


def test_round_trip_keeps_bf16_values_and_model(tmp_path):
    path = str(tmp_path / "k.safetensors")
    v = _values()
    saved = k_offset.save(path, v, "m#abc", {"source": "test", "tokens": 7})
    got = k_offset.load(path)
    want = v.to(torch.bfloat16).float()
    assert torch.equal(got.values, want) and torch.equal(saved.values, want)
    assert got.values.dtype == torch.float32
    assert (got.model_id, got.calibration) == ("m#abc", {"source": "test", "tokens": 7})
    assert got.digest == saved.digest == k_offset.digest(want)


def test_digest_format_and_sensitivity():
    a = _values().to(torch.bfloat16).float()
    d = k_offset.digest(a)
    assert k_offset.is_digest(d) and d.startswith("sha256:") and len(d) == len("sha256:") + 16
    b = a.clone()
    b[3, 1, 63] += 1
    assert k_offset.digest(b) != d
    assert k_offset.digest(a.reshape(L * H, D)) != d  # shape is part of it
    assert k_offset.is_digest("none")
    for bad in ("", "sha256:", "sha256:XYZ", "md5:0123456789abcdef", "sha256:0123456789abcdef0", None, 3):
        assert not k_offset.is_digest(bad)


def test_for_rank_slices_layers_and_heads():
    off = k_offset.KOffset(torch.arange(4 * 4 * 2, dtype=torch.float32).reshape(4, 4, 2), "m", {})
    assert torch.equal(off.for_rank(0, 4, 4), off.values)
    assert torch.equal(off.for_rank(1, 2, 4), off.values[1:3])  # pipeline stage: layers 1, 2
    assert torch.equal(off.for_rank(0, 4, 2, tp_rank=1, tp_size=2), off.values[:, 2:4])
    # 8 ranks over 4 kv heads: each head replicated on 2 ranks
    assert torch.equal(off.for_rank(0, 4, 1, tp_rank=5, tp_size=8), off.values[:, 2:3])
    with pytest.raises(ValueError, match="4 layers; this pool holds layers 2..4"):
        off.for_rank(2, 3, 4)
    with pytest.raises(ValueError, match="4 kv heads; this pool holds 3 per rank at tensor-parallel size 1"):
        off.for_rank(0, 4, 3)


@pytest.mark.parametrize("case", ["missing", "foreign", "version", "garbage", "nonfinite", "shape"])
def test_bad_files_name_the_variable_and_the_fix(tmp_path, case):
    path = str(tmp_path / "k.safetensors")
    meta = {"kind": k_offset.FILE_KIND, "version": k_offset.FILE_VERSION, "model_id": "m", "calibration": "{}"}
    if case == "foreign":
        save_file({"weight": torch.zeros(2)}, path)
    elif case == "version":
        save_file({"k_offset": torch.zeros(L, H, D)}, path, metadata={**meta, "version": "99"})
    elif case == "garbage":
        open(path, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    elif case == "nonfinite":
        save_file({"k_offset": torch.full((L, H, D), float("nan"))}, path, metadata=meta)
    elif case == "shape":
        save_file({"k_offset": torch.zeros(L, H * D)}, path, metadata=meta)
    with pytest.raises(ValueError) as e:
        k_offset.load(path)
    msg = str(e.value)
    assert f"MEMHA_K_OFFSET={path!r}" in msg and "python -m sglang_memha.calibrate" in msg
    if case == "version":
        assert "'99'" in msg


def test_save_refuses_non_finite_and_wrong_rank(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        k_offset.save(str(tmp_path / "a"), torch.full((L, H, D), float("inf")), "m", {})
    with pytest.raises(ValueError, match=r"\[num_layers, num_kv_heads, head_dim\]"):
        k_offset.save(str(tmp_path / "b"), torch.zeros(H, D), "m", {})


def _desc(**kw):
    base = dict(fmt="fp8_e4m3", page_size=16, num_kv_heads=H, head_dim=D, num_layers=L, model_id="m#1")
    return FormatDescriptor(**{**base, **kw})


def test_descriptor_carries_and_checks_the_offset_digest():
    d = k_offset.digest(_values())
    a = _desc(k_offset=d)
    assert FormatDescriptor.from_bytes(a.to_bytes()) == a
    assert json.loads(a.to_bytes())["k_offset"] == d
    assert a.check_compatible(_desc(k_offset=d)) == []
    assert FormatDescriptor.from_dict({k: v for k, v in _desc().to_dict().items() if k != "k_offset"}).k_offset == "none"
    with pytest.raises(ValueError, match="k_offset='sha256:zz'"):
        _desc(k_offset="sha256:zz")


@pytest.mark.parametrize("local,peer", [("a", "none"), ("none", "a"), ("a", "b")])
def test_different_offsets_are_refused_naming_the_fix(local, peer):
    digests = {"none": "none", "a": k_offset.digest(_values(1)), "b": k_offset.digest(_values(2))}
    with pytest.raises(FormatMismatchError) as e:
        _desc(k_offset=digests[local]).check_compatible(_desc(k_offset=digests[peer]))
    assert e.value.mismatches == [("k_offset", digests[local], digests[peer])]
    assert "MEMHA_K_OFFSET to the same calibration file on both servers" in str(e.value)


def test_encode_on_send_does_not_bridge_an_offset():
    """A bf16 prefill without the decode's offset cannot produce its rows (no send-time re-offset)."""
    d = k_offset.digest(_values())
    with pytest.raises(FormatMismatchError, match="k_offset"):
        _desc(k_offset=d).check_compatible(_desc(fmt="bf16"))
    assert _desc(k_offset=d).check_compatible(_desc(fmt="bf16", k_offset=d)) == ["encode_on_send"]
