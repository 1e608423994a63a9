"""Static K offset: a calibrated per-(layer, kv-head, channel) vector subtracted from K before it
is quantized (``MEMHA_K_OFFSET=<file>``).

Why: post-RoPE K of most LLMs carries large, nearly constant channels (biases, massive
activations). A per-(token, head) scale is set by them, so every other channel of the row loses
precision. Attention only needs ``softmax(q . k_j)`` over the keys j of one query, and
``q . (k_j - c) = q . k_j - q . c`` shifts every score of that query by the same amount, so
subtracting one fixed vector ``c`` from every K is exact in exact arithmetic. The pool stores
``quantize(k - c)`` and adds ``c`` back when it dequantizes, so readers still see model-space K.

Why static (calibrated once per model) and not the request's own mean: every K of every request,
prefill's and decode's alike, must use the same ``c`` (the decode writes the tokens it generates
with it), and pages shared through the prefix cache must not depend on which request wrote them.
A file both servers load satisfies both; the handshake compares its digest.

File: safetensors with one tensor ``k_offset`` [num_layers, num_kv_heads, head_dim] float32 (every
value a bf16 value, so ``k - c`` rounds the same everywhere), metadata ``kind``, ``version``,
``model_id`` (``model_id_of``; the pool refuses a file of another model) and free-form
``calibration`` (JSON: text source, tokens). Heads are all the model's kv heads; a tensor-parallel
rank takes its own (``for_rank``). Made by ``python -m sglang_memha.calibrate``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import torch

FILE_KIND = "sglang-memha-k-offset"
FILE_VERSION = "1"
NONE = "none"
_DIGEST = re.compile(r"sha256:[0-9a-f]{16}")
_MAKE = "make one with: python -m sglang_memha.calibrate --model-path <model> --out <file>"


def model_id_of(hf_config, model_path: str) -> str:
    """Model identity both PD sides (and an offset file) must share: path basename + hash of the
    shape-defining config fields (paths differ between machines; shapes and vocab must not)."""
    keys = ("architectures", "num_hidden_layers", "hidden_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "max_position_embeddings")
    shape = {k: getattr(hf_config, k, None) for k in keys}
    h = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{os.path.basename(os.path.normpath(model_path))}#{h}"


def is_digest(value: str) -> bool:
    """``value`` is ``"none"`` or a ``digest()`` string (descriptor field ``k_offset``)."""
    return isinstance(value, str) and (value == NONE or _DIGEST.fullmatch(value) is not None)


def digest(values: torch.Tensor) -> str:
    """``"sha256:<16 hex>"`` of the offset's float32 bytes (shape included): what the handshake compares."""
    v = values.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(json.dumps(list(v.shape)).encode())
    h.update(v.numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


@dataclass(frozen=True)
class KOffset:
    values: torch.Tensor  # [num_layers, num_kv_heads, head_dim] float32, bf16-valued, CPU
    model_id: str
    calibration: dict

    @property
    def digest(self) -> str:
        return digest(self.values)

    def for_rank(self, start_layer: int, num_layers: int, num_heads: int, tp_rank: int = 0,
                 tp_size: int = 1) -> torch.Tensor:
        """The rows one pool holds: layers ``[start_layer, start_layer + num_layers)`` (pipeline
        parallelism) and this attention-TP rank's ``num_heads`` kv heads -> [num_layers, num_heads,
        head_dim] float32. Heads are split evenly over ranks, or replicated when ranks outnumber
        them (SGLang's kv-head layouts)."""
        total_layers, heads, _ = self.values.shape
        if start_layer < 0 or start_layer + num_layers > total_layers:
            raise ValueError(f"MEMHA_K_OFFSET has {total_layers} layers; this pool holds layers "
                             f"{start_layer}..{start_layer + num_layers - 1} ({_MAKE})")
        v = self.values[start_layer:start_layer + num_layers]
        if heads == num_heads * tp_size:
            return v[:, tp_rank * num_heads:(tp_rank + 1) * num_heads].clone()
        if num_heads == 1 and tp_size > heads and tp_size % heads == 0:  # replicated kv heads
            return v[:, tp_rank // (tp_size // heads)].unsqueeze(1).clone()
        raise ValueError(f"MEMHA_K_OFFSET has {heads} kv heads; this pool holds {num_heads} per rank "
                         f"at tensor-parallel size {tp_size} ({_MAKE})")


def save(path: str, values: torch.Tensor, model_id: str, calibration: dict) -> KOffset:
    """Write ``values`` [L, H, D] (rounded to bf16, stored float32) to ``path``."""
    from safetensors.torch import save_file

    if values.dim() != 3:
        raise ValueError(f"k_offset must be [num_layers, num_kv_heads, head_dim], got {list(values.shape)}")
    v = values.detach().to("cpu", torch.float32).to(torch.bfloat16).float().contiguous()
    if not torch.isfinite(v).all():
        raise ValueError("k_offset has non-finite values (the calibration forward overflowed)")
    meta = {"kind": FILE_KIND, "version": FILE_VERSION, "model_id": model_id,
            "calibration": json.dumps(calibration, sort_keys=True)}
    save_file({"k_offset": v}, path, metadata=meta)
    return KOffset(v, model_id, calibration)


def load(path: str) -> KOffset:
    """Read a ``save()`` file; ValueError naming the file and the fix for anything else."""
    from safetensors import safe_open

    where = f"MEMHA_K_OFFSET={path!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where}: no such file ({_MAKE})")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("kind") != FILE_KIND or "k_offset" not in f.keys():
                raise ValueError(f"{where}: not an sglang-memha K offset file ({_MAKE})")
            if meta.get("version") != FILE_VERSION:
                raise ValueError(f"{where}: file version {meta.get('version')!r}, this build reads "
                                 f"{FILE_VERSION!r} ({_MAKE})")
            values = f.get_tensor("k_offset")
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{where}: unreadable ({e}); {_MAKE}") from None
    if values.dim() != 3 or values.dtype != torch.float32 or not torch.isfinite(values).all():
        raise ValueError(f"{where}: k_offset must be finite float32 [layers, kv_heads, head_dim], "
                         f"got {values.dtype} {list(values.shape)} ({_MAKE})")
    return KOffset(values, meta.get("model_id", ""), json.loads(meta.get("calibration") or "{}"))
