"""Exact-in-exact-arithmetic transforms that make low-bit K quantization usable.

``hadamard``: K (post-RoPE) is multiplied by the orthonormal Sylvester-Hadamard matrix
``Hn = H / sqrt(head_dim)`` (symmetric, ``Hn @ Hn = I``) before quantization. Attention needs
``q . k``; since ``(q Hn) . (k Hn) = q . k``, either rotate q the same way, or un-rotate the
dequantized K (``unrotate``). The rotation spreads the few large post-RoPE outlier channels over
all channels of the head, so per-token groups no longer waste their range on them. It is
token-local and needs no calibration: any page can be quantized and shipped on its own.
The descriptor field ``k_transform`` records it so both ends agree.

Rotation is done in fp32 (a matmul); it is part of the producer's math, not of the byte format,
so golden vectors cover the codecs only.
"""

from __future__ import annotations

import math

import torch

K_TRANSFORMS = ("none", "hadamard")
_CACHE: dict[tuple[int, torch.device], torch.Tensor] = {}


def hadamard_matrix(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[n, n] fp32 orthonormal Sylvester-Hadamard matrix; n must be a power of two."""
    if not isinstance(n, int) or n <= 0 or n & (n - 1):
        raise ValueError(f"head_dim={n!r}: the Hadamard K transform needs a power of two")
    key = (n, torch.device(device))
    if key not in _CACHE:
        h = torch.ones(1, 1)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        _CACHE[key] = (h / math.sqrt(n)).to(device)
    return _CACHE[key]


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] -> x @ Hn in fp32 (apply to K before quantize, and to q)."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


def unrotate(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rotate`` (Hn is its own inverse)."""
    return x.float() @ hadamard_matrix(x.shape[-1], x.device)


def apply_k_transform(name: str, k: torch.Tensor) -> torch.Tensor:
    if name not in K_TRANSFORMS:
        raise ValueError(f"k_transform={name!r}: expected one of {K_TRANSFORMS}")
    return k if name == "none" else rotate(k)
