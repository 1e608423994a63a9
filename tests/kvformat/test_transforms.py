"""Hadamard K rotation: orthonormal, keeps q.k exact, and cuts int4 error on outlier channels."""

from __future__ import annotations

import pytest
import torch

from sglang_memha.kvformat import get_codec
from sglang_memha.kvformat.transforms import apply_k_transform, hadamard_matrix, rotate, unrotate


@pytest.mark.parametrize("n", [16, 64, 128])
def test_orthonormal_and_self_inverse(n):
    h = hadamard_matrix(n)
    assert torch.allclose(h @ h.T, torch.eye(n), atol=1e-6)
    x = torch.randn(5, 3, n)
    assert torch.allclose(unrotate(rotate(x)), x, atol=1e-5)


def test_attention_scores_unchanged():
    q, k = torch.randn(7, 128), torch.randn(9, 128)
    assert torch.allclose(rotate(q) @ rotate(k).T, q @ k.T, atol=1e-4)


def test_rotation_reduces_int4_error_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(256, 2, 64, generator=g)
    k[..., 5] *= 30.0  # post-RoPE style outlier channels
    k[..., 40] *= -15.0
    codec = get_codec("int4_g32")
    plain = codec.dequantize(*codec.quantize(k), torch.float32)
    rot = unrotate(codec.dequantize(*codec.quantize(rotate(k)), torch.float32))
    mask = torch.ones(64, dtype=torch.bool)
    mask[[5, 40]] = False  # the ordinary channels are what attention mostly reads
    err_plain = (plain - k)[..., mask].pow(2).mean()
    err_rot = (rot - k)[..., mask].pow(2).mean()
    assert err_rot < 0.5 * err_plain


@pytest.mark.parametrize("bad", [0, 48, 96])
def test_non_power_of_two_rejected(bad):
    with pytest.raises(ValueError, match=f"head_dim={bad}: the Hadamard K transform needs a power of two"):
        hadamard_matrix(bad)


def test_unknown_transform_named():
    with pytest.raises(ValueError, match="k_transform='mean'"):
        apply_k_transform("mean", torch.zeros(1, 1, 64))
