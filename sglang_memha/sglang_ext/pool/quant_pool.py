"""``MemhaQuantKVPool``: an SGLang MHA KV pool that stores K and V in a ``kvformat`` format.

Buffers (format v4; ``kvformat/layout.py`` owns the geometry), per layer (K, V scale rows differ in int4_kivi_g64)::

    k_buffer[l], v_buffer[l]               uint8 [size + page_size, num_kv_heads, data_bytes_per_head]
    k_scale_buffer[l], v_scale_buffer[l]   uint8 [size + page_size, num_kv_heads, {k,v}_scale_bytes_per_head]

The scale lists are None for formats without per-row scales (bf16, ``fp8_e4m3_tensor``). Data
rows start on 16-byte boundaries (head_dim a multiple of 32), so a GPU kernel loads them with
vector loads; scales sit in their own slot-indexed buffers. Consequences, all on purpose:

* SGLang's slot moves and ``get_kv_size_bytes`` already carry ``k_scale_buffer`` beside the
  data (its FP4 pools use the same attribute), so they need no override here.
* PD transfer publishes ``[K data, K scale, V data, V scale]`` per layer range
  (``_build_kv_buffer_descs``/``_pd_registerable_tensors``): SGLang's MHA send splits that list
  into a K half and a V half and ships each entry with its own page bytes.
* CPU retraction copies (``get_cpu_copy``/``load_cpu_copy``) take the scale rows along.

Writes quantize (``set_kv_buffer`` -> ``codec.quantize_into``). Reads go through ``QuantKVView``:
``get_key_buffer(l)[slots]`` dequantizes only the rows an attention backend gathers (torch_native
indexes ``k_cache[per_req_tokens]``), never the whole layer. Anything else on the view raises
``TypeError`` instead of handing uint8 codes to a kernel that would read them as bf16.

Who calls what: SGLang's ``KVCacheConfigurator`` builds the pool (``configure.resolve_pool_class``
picks this class); attention backends call ``set_kv_buffer`` once per layer per forward and
``get_key_buffer``/``get_value_buffer`` right after; the PD managers read ``get_contiguous_buf_infos``
once at start-up. Nothing here blocks.
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from sglang_memha.kvformat import FormatDescriptor, KVFormat, format_spec, get_codec, k_offset
from sglang_memha.kvformat.kivi import BLOCK as KIVI_BLOCK
from sglang_memha.kvformat.layout import PoolLayout, RowLayout
from sglang_memha.kvformat.spec import MAX_ABS_INPUT
from sglang_memha.kvformat.transforms import apply_k_transform, unrotate
from sglang_memha.kvformat.triton_kernels import TRITON_FORMATS, quantize_to_slots, triton_available
from sglang_memha.sglang_ext import state
from sglang_memha.sglang_ext.pool.kivi_pool import OpenBlocks

logger = logging.getLogger("sglang_memha")


def _attention_tp() -> tuple[int, int]:
    """(rank, size) of the attention TP group (SGLang's ``get_parallel()``); (0, 1) where unset (a
    pool outside a scheduler). Import errors propagate: (0, 1) on a TP-2 rank takes wrong K offsets."""
    from sglang.srt.runtime_context import get_parallel

    try:
        return int(get_parallel().attn_tp_rank), int(get_parallel().attn_tp_size)
    except (RuntimeError, ValueError):
        return 0, 1


class QuantKVView:
    """What ``MemhaQuantKVPool.get_key_buffer`` returns: ``view[slots]`` -> dequantized rows.

    ``slots``: int64/int32 tensor [n] of slot ids (or anything torch indexing accepts on dim 0).
    Returns ``[n, num_kv_heads, head_dim]`` in the pool's compute dtype (bf16 for bf16 models).
    """

    def __init__(self, pool: MemhaQuantKVPool, buf: torch.Tensor, is_key: bool, layer_idx: int):
        self._pool = pool
        self._buf = buf
        self._is_key = is_key
        self._layer_idx = layer_idx  # pool-local
        self.dtype = pool.dtype
        self.device = buf.device
        self.shape = torch.Size((buf.shape[0], buf.shape[1], pool.head_dim))

    def __getitem__(self, slots) -> torch.Tensor:
        if self._is_key and self._pool.open_blocks is not None:  # int4_kivi: K blocks, open ones in bf16
            return self._pool.read_kivi_k(self._layer_idx, slots)
        return self._pool.read_slots(slots, self._is_key, self._layer_idx)

    def __len__(self) -> int:
        return self.shape[0]

    def __getattr__(self, name):
        raise TypeError(
            f"QuantKVView.{name}: the sglang-memha quantized KV pool only supports "
            f"view[slots] (gather + dequantize); this attention backend reads the KV buffer "
            f"some other way. Use --attention-backend torch_native with MEMHA_KV_FORMAT")


class MemhaQuantKVPool(MHATokenToKVPool):
    """``MHATokenToKVPool`` whose rows hold ``kvformat`` bytes (see module docstring).

    Extra class attributes are bound by ``configure.resolve_pool_class`` through ``configured()``
    (SGLang constructs the pool with its stock kwargs, so the format rides on the class).
    """

    memha_format: KVFormat = KVFormat.BF16
    memha_k_transform: str = "none"
    memha_model_id: str = "unknown"
    memha_k_offset_path: str | None = None  # MEMHA_K_OFFSET (kvformat.k_offset)

    # Set by ``pipeline.around_run_batch`` for one forward: called with the pool-local layer
    # index once that layer's rows are written (CPU: synchronous writes, so no event needed).
    memha_layer_listener = None

    @classmethod
    def configured(cls, fmt: KVFormat | str, k_transform: str = "none", model_id: str = "unknown",
                   k_offset_path: str | None = None) -> type[MemhaQuantKVPool]:
        fmt = KVFormat.parse(fmt)
        return type(f"MemhaQuantKVPool_{fmt.value}", (cls,),
                    {"memha_format": fmt, "memha_k_transform": k_transform, "memha_model_id": model_id,
                     "memha_k_offset_path": k_offset_path})

    def _create_buffers(self):
        if self.head_dim != self.v_head_dim:
            raise ValueError(f"sglang-memha KV formats need head_dim == v_head_dim, got "
                             f"{self.head_dim} and {self.v_head_dim}")
        if self.use_hnd or self.kv_cache_layout != "nhd" or self.post_capture_active:
            raise ValueError("sglang-memha KV formats support only the plain NHD pool layout "
                             "(unset SGLANG_USE_HND_KVCACHE / page-major / post-capture backing)")
        self.codec = get_codec(self.memha_format, role="v")  # K's too, except for int4_kivi(_g64)
        self.layout, self.v_layout = (RowLayout(self.memha_format, self.head_dim, side) for side in "kv")
        self.open_blocks = None
        block_coded = not format_spec(self.memha_format).token_local
        self.store_dtype = torch.uint8
        for name in ("k_scale_buffer", "v_scale_buffer", "native_k_scale_buffer",
                     "native_v_scale_buffer", "dq_k_buffer", "dq_v_buffer"):
            setattr(self, name, None)
        if not self.layout.aligned:
            logger.warning("sglang-memha KV pool: %s rows of head_dim %d are %d B, not a multiple of 16: "
                           "GPU kernels cannot load them with 16-byte vector loads",
                           self.memha_format.value, self.head_dim, self.layout.data_bytes)
        rows = self.size + self.page_size
        if block_coded:
            if self.page_size % KIVI_BLOCK:
                raise ValueError(f"MEMHA_KV_FORMAT={self.memha_format.value} codes K per {KIVI_BLOCK}-token block, "
                                 f"so --page-size must be a multiple of {KIVI_BLOCK} (got {self.page_size})")
            rows = -(-rows // KIVI_BLOCK) * KIVI_BLOCK  # whole blocks
        def buffers(per_head: int) -> list[torch.Tensor]:
            return [torch.zeros((rows, self.head_num, per_head), dtype=torch.uint8, device=self.device)
                    for _ in range(self.layer_num)]

        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self.k_buffer, self.v_buffer = buffers(self.layout.data_bytes), buffers(self.layout.data_bytes)
            if self.layout.has_scale_rows:
                self.k_scale_buffer = buffers(self.layout.scale_bytes)
                self.v_scale_buffer = buffers(self.v_layout.scale_bytes)
        # fp8_e4m3_tensor: one scale per layer for K and V, 1.0 (SGLang's default; the descriptor says so)
        self.layer_scale = torch.ones(1, dtype=torch.float32, device=self.device)
        if block_coded:
            # the residual holds K as written: the model dtype, or fp32 once rotated (fp32 arithmetic)
            shadow_dtype = self.dtype if self.memha_k_transform == "none" else torch.float32
            self.open_blocks = OpenBlocks(get_codec(self.memha_format, role="k"), self.layout, self.layer_num, rows,
                                          self.head_num, shadow_dtype, self.device)
        # per (layer, slot): the last K/V written there was non-finite (or |x| > MAX_ABS_INPUT); set
        # on the device without a host sync, read by the prefill's sender (``nonfinite_layers``)
        self.kv_nonfinite = torch.zeros((self.layer_num, rows), dtype=torch.bool, device=self.device)
        self.pool_layout = PoolLayout(self.memha_format, self.head_dim, self.head_num, self.layer_num,
                                      self.page_size)
        # CUDA: quantize-on-write with the Triton codecs, in place in the v4 buffers, no host sync
        self.triton_write = (torch.device(self.device).type == "cuda" and self.codec.fmt in TRITON_FORMATS
                             and triton_available())
        self._kv_buffer_descs = self._build_kv_buffer_descs()
        self._init_data_ptrs_and_strides()
        self.k_offset, offset_digest = self._load_k_offset()
        self.memha_descriptor = FormatDescriptor(
            fmt=self.memha_format, page_size=self.page_size, num_kv_heads=self.head_num,
            head_dim=self.head_dim, num_layers=self.layer_num, model_id=self.memha_model_id,
            k_transform=self.memha_k_transform, k_offset=offset_digest,
            kv_scales=((1.0, 1.0),) * self.layer_num if self.memha_format == KVFormat.FP8_E4M3_TENSOR else None)
        state.set_local_descriptor(self.memha_descriptor, pool=self)
        logger.warning(
            "sglang-memha KV pool: format=%s k_transform=%s k_offset=%s tokens=%d page_size=%d layers=%d "
            "kv_heads=%d head_dim=%d bytes_per_token=%d (bf16 would be %d)",
            self.memha_format.value, self.memha_k_transform, offset_digest, self.size, self.page_size,
            self.layer_num, self.head_num, self.head_dim, self.bytes_per_token(),
            2 * self.layer_num * self.head_num * self.head_dim * 2)

    def _load_k_offset(self) -> tuple[torch.Tensor | None, str]:
        """(this pool's rows of the MEMHA_K_OFFSET file, [layer_num, head_num, head_dim] fp32 on
        the pool's device, and the file's digest), or (None, "none")."""
        if self.memha_k_offset_path is None:
            return None, k_offset.NONE
        off = k_offset.load(self.memha_k_offset_path)
        if off.model_id != self.memha_model_id:
            raise ValueError(f"MEMHA_K_OFFSET={self.memha_k_offset_path!r} was calibrated for model "
                             f"{off.model_id!r}, this server runs {self.memha_model_id!r}: calibrate it "
                             f"for this model (python -m sglang_memha.calibrate --model-path <model> --out <file>)")
        if off.values.shape[-1] != self.head_dim:
            raise ValueError(f"MEMHA_K_OFFSET={self.memha_k_offset_path!r} has head_dim {off.values.shape[-1]}, "
                             f"the pool {self.head_dim}")
        rank, size = _attention_tp()
        rows = off.for_rank(self.start_layer, self.layer_num, self.head_num, rank, size)
        return rows.to(self.device), off.digest

    def bytes_per_token(self) -> int:
        """KV bytes one token occupies across all layers of this pool (K and V, scales included)."""
        return self.layer_num * self.head_num * (self.layout.row_bytes + self.v_layout.row_bytes)

    def scale_rows(self, is_key: bool, idx: int) -> torch.Tensor | None:
        """Scale buffer of pool-local layer ``idx`` (K or V), or None (no per-row scales)."""
        bufs = self.k_scale_buffer if is_key else self.v_scale_buffer
        return None if bufs is None else bufs[idx]

    # ---- PD publication (format v4 entry order: kvformat/layout.py) ------------------------
    def _pd_registerable_tensors(self):
        """Called by SGLang's ``get_contiguous_buf_infos`` (start-up): the entries in
        ``PoolLayout.entries`` order, K half then V half."""
        scales = self.k_scale_buffer is not None
        return [*self.k_buffer, *(self.k_scale_buffer if scales else ()),
                *self.v_buffer, *(self.v_scale_buffer if scales else ())]

    def _build_kv_buffer_descs(self):
        """SGLang's per-buffer span math for the same entries as ``_pd_registerable_tensors``."""
        from sglang.srt.mem_cache.memory_pool import KvBufferDesc

        return [KvBufferDesc(f"{e.side}_{e.kind}{e.layer}", tuple(t.shape), row_bytes=t[0].nbytes, tokens_per_row=1)
                for e, t in zip(self.pool_layout.entries, self._pd_registerable_tensors())]

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):
        """Called by the attention backend once per layer per forward (prefill and decode).

        cache_k, cache_v: [num_tokens, num_kv_heads * head_dim] or [num_tokens, num_kv_heads,
        head_dim], bf16/fp16/fp32. ``loc``: [num_tokens] int64 slots. Quantizes synchronously.
        """
        if dcp_kv_mask is not None:
            raise NotImplementedError("sglang-memha KV formats do not support decode context parallelism")
        if (k_scale not in (None, 1.0)) or (v_scale not in (None, 1.0)):
            raise NotImplementedError("sglang-memha KV formats compute their own scales; a checkpoint "
                                      "k_scale/v_scale is only meaningful with --kv-cache-dtype fp8_e4m3")
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        idx = layer_id - self.start_layer
        k, k_bad = _screen(cache_k.reshape(-1, self.head_num, self.head_dim))
        v, v_bad = _screen(cache_v.reshape(-1, self.head_num, self.v_head_dim))
        self._flag_nonfinite(idx, loc, k_bad | v_bad)
        k = self._to_stored_k(k, idx)
        if self.open_blocks is not None:
            self.open_blocks.write(idx, k, loc, self.k_buffer[idx], self.k_scale_buffer[idx])
        else:
            self._write(k, loc, self.k_buffer[idx], self.scale_rows(True, idx))
        self._write(v, loc, self.v_buffer[idx], self.scale_rows(False, idx))
        if self.memha_layer_listener is not None:  # prefill, MEMHA_PIPELINE=1: ship layer idx now
            self.memha_layer_listener(idx)

    def _flag_nonfinite(self, idx: int, loc: torch.Tensor, bad: torch.Tensor) -> None:
        """Record ``bad`` ([n] bool) for slots ``loc`` of layer ``idx``. A write at a page's first
        slot starts the page for a new owner: its flags are cleared first, since ``nonfinite_layers``
        checks whole pages and a freed request's flags in slots left unwritten refused healthy
        requests. No host sync, fixed shapes (CUDA graphs): other writes clear padding page 0."""
        flags = self.kv_nonfinite[idx]
        if self.page_size > 1:
            loc = loc.long()
            per_page = flags.view(-1, self.page_size)  # rows are whole pages (size + page_size)
            per_page[torch.where(loc % self.page_size == 0, loc // self.page_size, 0)] = False
        flags[loc] = bad

    def nonfinite_layers(self, pages) -> list[int]:
        """Pool-local layers where any slot of ``pages`` ([n] page ids) holds K/V that was
        non-finite when written (stored as zeros). Called by the prefill's transfer worker before
        a chunk's pages go out, so only that request fails; reads one device flag (a sync on a
        GPU, on that thread, not on the forward's)."""
        pages = torch.as_tensor(pages, device=self.kv_nonfinite.device).long().reshape(-1)
        if pages.numel() == 0:
            return []
        slots = (pages[:, None] * self.page_size + torch.arange(self.page_size, device=pages.device)).reshape(-1)
        return self.kv_nonfinite[:, slots].any(dim=1).nonzero().flatten().tolist()

    def _to_stored_k(self, k: torch.Tensor, idx: int) -> torch.Tensor:
        """Model-space K [n, H, D] -> what the rows store: K - offset (fp32, then back to K's dtype
        unless rotated next), then the K transform (fp32 out)."""
        if self.k_offset is not None:
            k = (k.float() - self.k_offset[idx]).to(k.dtype if self.memha_k_transform == "none" else torch.float32)
        if self.memha_k_transform != "none":
            k = apply_k_transform(self.memha_k_transform, k)
        return k

    def _write(self, x: torch.Tensor, loc: torch.Tensor, data: torch.Tensor, scales: torch.Tensor | None) -> None:
        if self.triton_write:
            quantize_to_slots(self.codec.fmt, x.contiguous(), loc.long(), data, scales)
        elif self.layout.has_layer_scale:
            self.codec.quantize_into(x, loc, data, None, scale=float(self.layer_scale))
        else:
            self.codec.quantize_into(x, loc, data, scales)

    # ---- read ------------------------------------------------------------------------------
    def read_rows(self, data: torch.Tensor, raw_scales: torch.Tensor | None, is_key: bool,
                  idx: int) -> torch.Tensor:
        """Gathered rows of pool-local layer ``idx``: data [n, H, data_bytes] and scale rows
        [n, H, scale_bytes] (None without per-row scales) uint8 -> [n, H, head_dim] in ``self.dtype``."""
        if self.layout.has_layer_scale:
            scales = self.layer_scale
        else:
            scales = None if raw_scales is None else self.codec.scales_from_bytes(raw_scales.contiguous())
        return self._in_model_space(lambda dt: self.codec.dequantize(data.contiguous(), scales, dt), is_key, idx)

    def read_slots(self, slots, is_key: bool, idx: int) -> torch.Tensor:
        """``read_rows`` of ``slots`` of pool-local layer ``idx``: the codec's fused gather +
        dequantize where it has one and the rows are already model space (V, or K with no
        transform or offset), else gather, then decode. The codec's reader of a layer's buffers
        (``fused_row_reader``: checks done once) is kept while those buffers are the pool's."""
        data, scales = (self.k_buffer if is_key else self.v_buffer)[idx], self.scale_rows(is_key, idx)
        if not (is_key and self._k_not_model_space):
            held = self.__dict__.setdefault("_row_readers", {}).get((is_key, idx))
            if held is None or held[0] is not data:  # the reader holds `data`: `is` cannot alias
                held = self._row_readers[(is_key, idx)] = (
                    data, self.codec.fused_row_reader(data, scales, self.head_dim, self.dtype))
            if (out := held[1](slots)) is not None:
                return out
        return self.read_rows(data[slots], None if scales is None else scales[slots], is_key, idx)

    def read_kivi_k(self, idx: int, slots, residual: bool = True) -> torch.Tensor:
        """int4_kivi K of ``slots`` of pool-local layer ``idx`` -> [n, H, head_dim] in ``self.dtype``
        (``residual``: see ``OpenBlocks.read``)."""
        return self._in_model_space(
            lambda dt: self.open_blocks.read(idx, slots, self.k_buffer[idx], self.k_scale_buffer[idx], dt, residual),
            True, idx)

    @property
    def _k_not_model_space(self) -> bool:
        """Stored K differs from the model's K (a K transform or a K offset is on)."""
        return self.memha_k_transform != "none" or self.k_offset is not None

    def _in_model_space(self, decode, is_key: bool, idx: int) -> torch.Tensor:
        """``decode(out_dtype)`` of stored rows of pool-local layer ``idx``; for K, the inverse of
        ``_to_stored_k`` (un-rotate, add the offset back) in fp32 before the cast."""
        if not (is_key and self._k_not_model_space):
            return decode(self.dtype)
        x = decode(torch.float32)
        if self.memha_k_transform != "none":
            x = unrotate(x)
        if self.k_offset is not None:
            x = x + self.k_offset[idx]
        return x.to(self.dtype)

    def apply_bridge(self, slots: torch.Tensor, bridge) -> None:
        """Convert arrived rows ``slots`` of every layer in place (fnuz <-> fn; same row size).
        Raises ValueError (NaN codes) before writing anything, so a refused request keeps no
        half-converted rows."""
        from sglang_memha.kvformat import Bridge
        from sglang_memha.kvformat.fp8 import fn_to_fnuz, fnuz_to_fn

        fn = {Bridge.FNUZ_TO_FN: fnuz_to_fn, Bridge.FN_TO_FNUZ: fn_to_fnuz}[bridge]
        pairs = list(zip((*self.k_buffer, *self.v_buffer), (*self.k_scale_buffer, *self.v_scale_buffer)))
        converted = [fn(data[slots].contiguous(), scales[slots].contiguous()) for data, scales in pairs]
        for (data, scales), (new_data, new_scales) in zip(pairs, converted):
            data[slots], scales[slots] = new_data, new_scales

    # ---- retraction (CPU backup of a request's rows) --------------------------------------------
    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        """Called by SGLang's decode scheduler when it retracts a request: every buffer's rows of
        ``indices`` (data and scale rows), on CPU. int4_kivi: whole K blocks, since an open
        block's later rows carry its channel table."""
        indices = self._whole_blocks(indices)
        return [[buf[indices].to("cpu") for buf in self.layer_buffers(i)] for i in range(self.layer_num)]

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        """Inverse of ``get_cpu_copy`` when the retracted request is resumed."""
        indices = self._whole_blocks(indices)
        for i, rows in enumerate(kv_cache_cpu):
            for buf, saved in zip(self.layer_buffers(i), rows):
                buf[indices] = saved.to(buf.device)

    def layer_buffers(self, idx: int) -> list[torch.Tensor]:
        """Every buffer of pool-local layer ``idx``: K data, V data, then K and V scale rows."""
        out = [self.k_buffer[idx], self.v_buffer[idx]]
        if self.k_scale_buffer is not None:
            out += [self.k_scale_buffer[idx], self.v_scale_buffer[idx]]
        return out

    def _whole_blocks(self, indices):
        """A request's slots (position order) -> every slot of the K blocks they touch (int4_kivi;
        the others: ``indices`` as is). The request owns those slots: its pages are whole blocks."""
        if self.open_blocks is None or len(indices) == 0:
            return indices
        blocks = torch.unique_consecutive(torch.as_tensor(indices).long() // KIVI_BLOCK)
        return (blocks[:, None] * KIVI_BLOCK + torch.arange(KIVI_BLOCK, device=blocks.device)).reshape(-1)

    def _get_key_buffer(self, layer_id: int):
        return QuantKVView(self, self.k_buffer[layer_id - self.start_layer], True, layer_id - self.start_layer)

    def _get_value_buffer(self, layer_id: int):
        return QuantKVView(self, self.v_buffer[layer_id - self.start_layer], False, layer_id - self.start_layer)

    def set_kv_buffer_prefix_valid(self, *args, **kwargs):
        raise NotImplementedError("prefix-valid commit is not supported by sglang-memha KV formats")


def _screen(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [n, H, D] -> (x with every non-finite or |x| > MAX_ABS_INPUT element replaced by 0, bad
    [n] bool: the token had such an element). No host sync on a GPU: a NaN in one request's K
    must fail that request at send time (``nonfinite_layers``), not raise inside the forward,
    which would end the scheduler and every request on it. CPU skips the rewrite when all is well."""
    ok = x.abs() <= MAX_ABS_INPUT  # False for NaN and +-inf
    bad = ~ok.flatten(1).all(dim=1)
    if x.is_cuda or bool(bad.any()):
        x = torch.where(ok, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x, bad
