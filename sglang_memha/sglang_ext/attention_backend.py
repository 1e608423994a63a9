"""``--attention-backend memha_triton``: SGLang's Triton backend, reading the quantized pool.

What it is: a subclass of SGLang's ``TritonAttnBackend``. SGLang's own code keeps building the
metadata (``kv_indptr``/``kv_indices``: token-level slot ids), the CUDA-graph buffers and the
extend plan; this class replaces only the two kernel calls, and only when the pool is a
``MemhaQuantKVPool``. On SGLang's own pool (``MEMHA_KV_FORMAT`` unset) it is SGLang's Triton
backend, unchanged.

* decode: ``sglang_memha.attention.decode_attention`` reads one layer's v4 code and scale buffers
  and dequantizes inside the kernel. No bf16 copy of the context, no host sync, and a split
  count fixed at start-up (``default_num_kv_splits(context_len)``), so it can be captured in a
  CUDA graph.
* extend (the prefill's chunks, the decode's retraction resume): the prefix rows the batch reads
  are gathered and dequantized into a bf16 scratch (model space: K transform and offset undone),
  then SGLang's own ``extend_attention_fwd`` runs over that scratch with identity indices. The
  chunk's own tokens are read back as stored too (unlike SGLang's fp8 cache, which attends to
  them at full precision): the result is then the same whichever backend ran the prefill and
  wherever chunks were cut, and equals the CPU path (``torch_native``) up to summation order.
* writes: ``set_kv_buffer`` of the pool (quantize on write; the Triton codecs on CUDA).

Q in the stored K space: with ``MEMHA_K_TRANSFORM=hadamard`` stored keys are ``(k - c) H`` with H
orthonormal, so ``(q H) . stored = q . (k - c)``: q is rotated once per layer per step. A K offset
``c`` needs nothing: ``q . c`` is the same for every key of a query row and cancels in softmax.
That argument fails under logit soft-capping (``cap * tanh(x / cap)`` is not shift-invariant), so a
soft-capped model with a K offset is refused; without an offset the cap is applied in the kernel.

Who calls what: SGLang's ``attention_registry`` calls ``create_backend(model_runner)`` once per
model runner at scheduler start-up (after the KV pool is built); ``forward_decode`` /
``forward_extend`` run once per layer per forward on the scheduler's thread. Nothing blocks
except the extend path's prefix-length read where SGLang did not pass it on the host.
"""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("sglang_memha")

BACKEND_NAME = "memha_triton"


class UnsupportedAttention(RuntimeError):
    """Raised at start-up when ``memha_triton`` cannot serve this model or server; names the fix."""


def register() -> None:
    """Called from ``plugin.register()`` in every SGLang process, before argument parsing:
    adds the ``--attention-backend`` choice (the launcher's argparse reads that list) and the
    factory (the scheduler's model runner looks it up by name). Raises on an SGLang without
    these extension points; ``plugin.register`` turns that into a start-up refusal."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import register_attention_backend

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(create_backend)


def refuse_if_requested(reason: str):
    """A BEFORE hook for the first SGLang call of a process (``prepare_server_args(argv)`` in the
    launcher, ``Scheduler.__init__(server_args, ...)`` in a scheduler) that stops start-up when
    the server asks for ``memha_triton`` but ``register()`` failed; other servers start."""

    def refuse(*args, **kwargs):
        if any(BACKEND_NAME in str(a) for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple, str))) \
                or BACKEND_NAME in backends_of(_server_args_in(args, kwargs)):
            raise SystemExit(f"sglang-memha: --attention-backend {BACKEND_NAME} is unavailable: "
                             f"registering it with SGLang failed ({reason}). This plugin targets "
                             f"SGLang 0.5.23; use --attention-backend torch_native, or that SGLang")

    return refuse


def _server_args_in(args, kwargs):
    return kwargs.get("server_args") or next((a for a in args if hasattr(a, "attention_backend")), None)


def backends_of(server_args) -> set[str]:
    """The attention backends a ``ServerArgs`` names (main, prefill-only, decode-only)."""
    return {getattr(server_args, n, None) for n in ("attention_backend", "prefill_attention_backend",
                                                    "decode_attention_backend")} - {None}


def create_backend(model_runner):
    """SGLang's attention registry calls this once per model runner (scheduler start-up)."""
    from sglang_memha.sglang_ext.attention_triton import MemhaTritonAttnBackend

    return MemhaTritonAttnBackend(model_runner)


def refusals(model_runner, dcp_size: int | None = None) -> list[str]:
    """What ``memha_triton`` cannot serve on this model runner, each with the reason
    (``dcp_size``: None reads SGLang's published parallel config)."""
    if dcp_size is None:
        from sglang.srt.runtime_context import get_parallel

        dcp_size = get_parallel().attn_dcp_size
    out = []
    mc = model_runner.model_config
    if getattr(model_runner, "use_mla_backend", False):
        out.append("MLA models (their latent KV is not a per-head K/V row)")
    if model_runner.sliding_window_size is not None:
        out.append("sliding-window attention (its window index is not read by this kernel)")
    if dcp_size > 1:
        out.append("decode context parallelism (the kernel reads whole requests, not DCP shards)")
    spec = getattr(model_runner, "spec_algorithm", None)
    if spec is not None and not spec.is_none():
        out.append("speculative decoding (target-verify and draft passes are not implemented)")
    if getattr(mc, "is_encoder_decoder", False):
        out.append("encoder-decoder models (cross attention)")
    cap = getattr(getattr(mc, "hf_text_config", None) or mc.hf_config, "attn_logit_softcapping", None)
    if cap and getattr(getattr(model_runner, "token_to_kv_pool", None), "k_offset", None) is not None:
        out.append(f"logit soft-capping with MEMHA_K_OFFSET (attn_logit_softcapping={cap}: the offset's "
                   f"q . c no longer cancels once the logits are capped; unset MEMHA_K_OFFSET)")
    return out


def format_refusal(fmt) -> str | None:
    """Why ``memha_triton`` cannot read pool format ``fmt`` (a ``KVFormat``), or None if it can."""
    from sglang_memha.attention.decode import DECODE_FORMATS

    if fmt in DECODE_FORMATS:
        return None
    kivi = "its open K block lives in a side table the kernel does not read"
    why = {"int4_kivi": kivi, "int4_kivi_g64": kivi,
           "fp8_e4m3_tensor": "use SGLang's own fp8 pool (--kv-cache-dtype fp8_e4m3, no MEMHA_KV_FORMAT) "
                              "with --attention-backend triton or flashinfer"}.get(fmt.value, "not implemented")
    return (f"--attention-backend {BACKEND_NAME} reads {[f.value for f in DECODE_FORMATS]}, not "
            f"MEMHA_KV_FORMAT={fmt.value} ({why}). Use --attention-backend torch_native, or one of those formats")
