"""Codec interface shared by every format, input checks, pool write/gather, and the registry.

A codec turns K or V of a batch of tokens into page bytes and back. Shapes (FlashInfer style,
NHD layout, all on the same device, CPU or CUDA):

    x       [num_tokens, num_kv_heads, head_dim]             bf16 | fp16 | fp32
    data    [num_tokens, num_kv_heads, data_bytes_per_head]   uint8
    scales  [num_tokens, num_kv_heads, ...]                   format's scale dtype, or None

``quantize`` and ``dequantize`` are pure torch, vectorized over tokens and heads (no Python
loop over tokens); the Triton kernels in ``triton_kernels.py`` produce the same bytes on GPU.
Inputs must be finite with ``|x| <= MAX_ABS_INPUT``; anything else raises ``ValueError``.
"""

from __future__ import annotations

import functools
import importlib

import torch

from sglang_memha.kvformat.spec import FORMAT_SPECS, MAX_ABS_INPUT, SIDE_FORMATS, FormatSpec, KVFormat, side_format

INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
OUTPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_input(x: torch.Tensor, spec: FormatSpec, name: str = "x") -> torch.Tensor:
    """Validate a K/V batch and return it as fp32 (exact for bf16/fp16 inputs)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name}.shape={tuple(x.shape)}: expected [num_tokens, num_kv_heads, head_dim]")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"{name}.dtype={x.dtype}: expected one of bf16, fp16, fp32")
    spec.check_head_dim(x.shape[-1])
    x32 = x.float()
    # The value check reads the result on the host: on a GPU that is a sync per call (and breaks
    # CUDA-graph capture), so there it runs only with MEMHA_CHECK_KV=1; pools screen their
    # inputs without a sync instead (``quant_pool._screen``).
    if x32.numel() and (not x32.is_cuda or _check_on_gpu()):
        lo, hi = torch.aminmax(x32)  # one pass, no temporaries; NaN propagates
        if not (-MAX_ABS_INPUT <= float(lo) and float(hi) <= MAX_ABS_INPUT):
            bad = ~(x32.abs() <= MAX_ABS_INPUT)  # also true for NaN
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name} has {int(bad.sum())} element(s) that are non-finite or exceed "
                f"|x| <= {MAX_ABS_INPUT:g} (first at index {idx}: {x32[idx].item()}); "
                f"KV codecs reject them instead of encoding garbage"
            )
    return x32


@functools.cache
def _check_on_gpu() -> bool:
    from sglang_memha.config import load_config

    return load_config().check_kv


def bf16_round(x32: torch.Tensor, up: bool) -> torch.Tensor:
    """fp32 -> bf16 rounded toward +inf (up) or -inf (down), exactly (bit manipulation).
    Finite inputs only (inf stays inf; NaN is unspecified)."""
    bits = x32.contiguous().view(torch.int32)
    low = bits & 0xFFFF
    neg = bits < 0
    bump = (low != 0) & (~neg if up else neg)  # truncation rounds toward zero; bump the magnitude
    out = (bits & -65536) + bump.to(torch.int32) * 65536
    return out.view(torch.float32).to(torch.bfloat16)


def check_out_dtype(out_dtype: torch.dtype) -> None:
    if out_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: expected one of bf16, fp16, fp32")


class KVCodec:
    """Quantize/dequantize one K or V tensor in one format. Stateless and thread-safe."""

    fmt: KVFormat

    def __init__(self) -> None:
        self.spec = FORMAT_SPECS[self.fmt]

    # ---- per-format hooks ---------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [T, H, D] bf16/fp16/fp32 -> (data [T, H, data_bytes_per_head] uint8, scales | None)."""
        raise NotImplementedError

    def dequantize(
        self, data: torch.Tensor, scales: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16
    ) -> torch.Tensor:
        """(data, scales) from ``quantize`` -> x_hat [T, H, D] in ``out_dtype``."""
        raise NotImplementedError

    def scale_shape(self, num_tokens: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...] | None:
        """Shape of the ``scales`` tensor ``quantize`` returns (None: no scales)."""
        return None

    scale_dtype: torch.dtype | None = None

    # ---- shared -----------------------------------------------------------------------------
    def head_dim_of(self, data: torch.Tensor) -> int:
        return data.shape[-1] * 8 // self.spec.bits

    def check_data(self, data: torch.Tensor, scales: torch.Tensor | None) -> int:
        """Validate quantized inputs; returns head_dim."""
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or data.dim() != 3:
            got = f"{tuple(data.shape)} {data.dtype}" if isinstance(data, torch.Tensor) else type(data).__name__
            raise ValueError(f"data={got}: expected uint8 [num_tokens, num_kv_heads, data_bytes_per_head]")
        head_dim = self.head_dim_of(data)
        self.spec.check_head_dim(head_dim)
        want = self.scale_shape(data.shape[0], data.shape[1], head_dim)
        if want is None:
            if scales is not None and self.spec.scale_scope != "layer":
                raise ValueError(f"scales must be None for {self.fmt.value}, got shape {tuple(scales.shape)}")
        else:
            if scales is None or tuple(scales.shape) != want or scales.dtype != self.scale_dtype:
                got = None if scales is None else f"{tuple(scales.shape)} {scales.dtype}"
                raise ValueError(f"scales={got}: expected {want} {self.scale_dtype} for {self.fmt.value}")
        return head_dim

    def scale_bytes(self, scales: torch.Tensor | None) -> torch.Tensor | None:
        """Scales as raw bytes [T, H, scale_bytes_per_head] uint8 (the pool's scale-buffer rows)."""
        if scales is None or self.spec.scale_scope == "layer":
            return None
        t, h = scales.shape[:2]
        return scales.contiguous().view(torch.uint8).reshape(t, h, -1)

    def scales_from_bytes(self, raw: torch.Tensor) -> torch.Tensor | None:
        """Inverse of ``scale_bytes``."""
        if self.scale_dtype is None or self.spec.scale_scope == "layer":
            return None
        t, h = raw.shape[:2]
        entries = raw.shape[2] // self.spec.scale_entry_bytes
        grouped = self.spec.scale_scope in ("group", "channel_block")
        head_dim = entries * self.spec.group_size if grouped else self.spec.head_dim_multiple
        shape = self.scale_shape(t, h, head_dim)
        return raw.contiguous().view(self.scale_dtype).reshape(shape)

    def quantize_into(
        self,
        x: torch.Tensor,
        loc: torch.Tensor,
        data_pool: torch.Tensor,
        scale_pool: torch.Tensor | None,
    ) -> None:
        """Quantize-on-write: ``data_pool[loc] = data``, ``scale_pool[loc] = scale bytes``.

        data_pool  [num_slots, num_kv_heads, data_bytes_per_head]  uint8
        scale_pool [num_slots, num_kv_heads, scale_bytes_per_head] uint8 (None if no scales)
        loc        [num_tokens] int64 slot indices
        """
        data, scales = self.quantize(x)
        data_pool[loc] = data
        raw = self.scale_bytes(scales)
        if raw is not None:
            if scale_pool is None:
                raise ValueError(f"scale_pool is None but {self.fmt.value} has per-token scales")
            scale_pool[loc] = raw

    def gather_rows_fused(self, data_pool: torch.Tensor, scale_pool: torch.Tensor | None, slots, head_dim: int,
                          out_dtype: torch.dtype) -> torch.Tensor | None:
        """``dequantize`` of ``data_pool[slots]`` with ``scale_pool[slots]`` in one fused pass, where
        this codec has one for this input (fp8 per token-head on CPU, bf16 out); None otherwise
        (the caller gathers, then dequantizes). Pools as in ``quantize_into`` (format v4 buffers)."""
        return None

    def fused_row_reader(self, data_pool: torch.Tensor, scale_pool: torch.Tensor | None, head_dim: int,
                         out_dtype: torch.dtype):
        """``slots -> gather_rows_fused(data_pool, scale_pool, slots, head_dim, out_dtype)`` for one
        pool layer's buffers. Who calls it: the decode pool, once per layer and K/V, keeping the
        result (``read_slots``). A codec whose checks depend only on the buffers does them here,
        once: torch_native reads per request, layer and K/V, so per-call checks add up."""
        return lambda slots: self.gather_rows_fused(data_pool, scale_pool, slots, head_dim, out_dtype)

    def gather_dequantize(
        self,
        data_pool: torch.Tensor,
        scale_pool: torch.Tensor | None,
        page_ids: torch.Tensor,
        page_size: int,
        out_dtype: torch.dtype = torch.bfloat16,
        **kw,
    ) -> torch.Tensor:
        """Dequantize whole pages: -> [len(page_ids) * page_size, num_kv_heads, head_dim]."""
        slots = (page_ids.long()[:, None] * page_size + torch.arange(page_size, device=page_ids.device)).reshape(-1)
        scales = None if scale_pool is None else self.scales_from_bytes(scale_pool[slots])
        return self.dequantize(data_pool[slots], scales, out_dtype, **kw)


_REGISTRY: dict[KVFormat, tuple[str, str]] = {
    KVFormat.BF16: ("sglang_memha.kvformat.identity", "Bf16Codec"),
    KVFormat.FP8_E4M3: ("sglang_memha.kvformat.fp8", "Fp8TokenHeadCodec"),
    KVFormat.FP8_E4M3_TENSOR: ("sglang_memha.kvformat.fp8", "Fp8TensorCodec"),
    KVFormat.FP8_E4M3FNUZ: ("sglang_memha.kvformat.fp8", "Fp8FnuzCodec"),
    KVFormat.INT8: ("sglang_memha.kvformat.intq", "Int8Codec"),
    KVFormat.INT4_G32: ("sglang_memha.kvformat.intq", "Int4G32Codec"),
    KVFormat.INT4_G64: ("sglang_memha.kvformat.intq", "Int4G64Codec"),
    KVFormat.BFP8: ("sglang_memha.kvformat.bfp", "Bfp8Codec"),
    KVFormat.INT4_KIVI: ("sglang_memha.kvformat.kivi", "Int4KiviKCodec"),
}  # int4_kivi_g64 has no entry: its K and V codecs are other formats' (SIDE_FORMATS)
_CACHE: dict[KVFormat, KVCodec] = {}


def get_codec(fmt: str | KVFormat, role: str | None = None) -> KVCodec:
    """The codec for ``fmt`` (imported lazily; unknown names list the supported ones).

    ``role`` ("k" or "v") picks K's or V's codec; it is required for formats that code them
    differently (``SIDE_FORMATS``: ``int4_kivi``, ``int4_kivi_g64``), whose K codec is int4_kivi's
    and V codec int4_g32's or int4_g64's (``spec.side_format``), and ignored by the others, which
    code both alike."""
    fmt = KVFormat.parse(fmt)
    if role not in (None, "k", "v"):
        raise ValueError(f"role={role!r}: expected 'k', 'v' or None")
    if fmt in SIDE_FORMATS:
        if role is None:
            raise ValueError(f"{fmt.value} codes K and V differently: call get_codec({fmt.value!r}, role='k' or 'v')")
        fmt = side_format(fmt, role)
    if fmt not in _CACHE:
        module, cls = _REGISTRY[fmt]
        _CACHE[fmt] = getattr(importlib.import_module(module), cls)()
    return _CACHE[fmt]
