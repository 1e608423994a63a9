"""The one place that reads ``MEMHA_*`` environment variables.

| variable              | default                   | meaning                                             |
|-----------------------|---------------------------|-----------------------------------------------------|
| ``MEMHA_CACHE_DIR``   | ``~/.cache/sglang-memha`` | built models and downloaded wheels (outside the repo) |
| ``MEMHA_CPU_COMPAT``  | ``auto``                  | ``auto``: apply CPU compat when ``SGLANG_USE_CPU_ENGINE=1``; ``0``: never; ``1``: always |
| ``MEMHA_CPU_KERNELS`` | ``1``                     | ``0``: never build/use the fused C codec kernels (torch reference only) |
| ``MEMHA_CHECK_KV``    | ``0``                     | ``1``: codecs also check K/V values on a GPU (a host sync per call; debugging only). CPU always checks; pools zero non-finite K/V without a sync and fail only that request |
| ``MEMHA_KV_FORMAT``   | unset (plugin KV path off) | KV page format of this server's pool: one of ``kvformat.KVFormat`` (``bf16``, ``fp8_e4m3``, ``int8``, ``int4_g64``, ``int4_kivi`` / ``int4_kivi_g64`` (``--page-size`` a multiple of 32), ...). Set it on BOTH prefill and decode |
| ``MEMHA_K_TRANSFORM`` | ``none``                  | ``hadamard``: rotate K before quantizing (better low-bit quality); both sides must agree |
| ``MEMHA_K_OFFSET``    | unset                     | a K offset file (``python -m sglang_memha.calibrate``): subtract a calibrated per-channel K vector before quantizing (exact for attention; better fp8/int8 quality, large-K-bias models). Needs ``MEMHA_KV_FORMAT``; set the same file on both sides |
| ``MEMHA_DECODE_DEQUANT`` | ``deferred``           | decode only. ``deferred``: keep arrived pages quantized, dequantize in attention; ``eager``: dequantize on arrival into a bf16 pool (ablation) |
| ``MEMHA_PIPELINE``    | ``0``                     | prefill only. ``1``: send each layer's KV while later layers compute (needs ``MEMHA_KV_FORMAT``; ``bf16`` for an unquantized pipelined pool) |
| ``MEMHA_PIPELINE_MIN_TOKENS`` | ``256``           | prompts shorter than this are sent whole after the forward (256: the shortest measured, already a gain; see eval/RESULTS.md) |
| ``MEMHA_ENCODE_ON_SEND`` | ``1``                | prefill on SGLang's own bf16 or fp8 pool (``MEMHA_KV_FORMAT`` unset): publish its format so a decode with ``MEMHA_KV_FORMAT`` accepts it, and convert the pages it sends into that decode's format. ``0``: behave as stock SGLang (a memha decode refuses it) |
| ``MEMHA_SHARED_SECRET`` | unset                 | both servers: the handshake carries HMAC-SHA256 tags with this secret; a peer with another (or no) secret is refused with a message, before any KV byte moves. ``MEMHA_SHARED_SECRET_FILE``: read it from a file instead (first line) |

The variables are read in every SGLang process the plugin loads in (the schedulers inherit the
launcher's environment), so setting them on the launch command is enough.

Launch flags (``sglang_ext/flags.py``) write eight of them into the launcher's environment before
any scheduler starts, so this module stays their one reader: ``--memha-kv-format``,
``--memha-k-transform``, ``--memha-k-offset``, ``--memha-decode-dequant``, ``--memha-pipeline`` (= ``1``),
``--memha-pipeline-min-tokens``, ``--memha-shared-secret-file``, ``--memha-encode-on-send``. A flag
overrides its variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

_CPU_COMPAT_VALUES = ("auto", "0", "1")
K_TRANSFORM_VALUES = ("none", "hadamard")
DECODE_DEQUANT_VALUES = ("deferred", "eager")


@dataclass(frozen=True)
class MemhaConfig:
    cache_dir: str
    cpu_compat: str  # one of _CPU_COMPAT_VALUES
    cpu_kernels: bool = True
    check_kv: bool = False  # codecs' value check on GPU tensors too (a host sync per call)
    kv_format: str | None = None  # None: the quantized-KV path is off (stock SGLang pools)
    k_transform: str = "none"
    k_offset: str | None = None  # path of a kvformat.k_offset file
    decode_dequant: str = "deferred"
    pipeline: bool = False
    pipeline_min_tokens: int = 256
    encode_on_send: bool = True
    shared_secret: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.cpu_compat not in _CPU_COMPAT_VALUES:
            raise ValueError(f"MEMHA_CPU_COMPAT={self.cpu_compat!r}: expected one of {_CPU_COMPAT_VALUES}")
        if self.kv_format is not None:
            from sglang_memha.kvformat.spec import KVFormat

            try:
                KVFormat.parse(self.kv_format)
            except ValueError as e:
                raise ValueError(f"MEMHA_KV_FORMAT: {e}") from None
        if self.k_transform not in K_TRANSFORM_VALUES:
            raise ValueError(f"MEMHA_K_TRANSFORM={self.k_transform!r}: expected one of {K_TRANSFORM_VALUES}")
        if self.k_offset is not None:
            if self.kv_format is None:
                raise ValueError("MEMHA_K_OFFSET needs MEMHA_KV_FORMAT (the plugin's pool subtracts the offset): "
                                 "set MEMHA_KV_FORMAT on both servers, or unset MEMHA_K_OFFSET")
            if not os.path.isfile(self.k_offset):
                raise ValueError(f"MEMHA_K_OFFSET={self.k_offset!r}: no such file (make one with: python -m "
                                 f"sglang_memha.calibrate --model-path <model> --out <file>)")
        if self.decode_dequant not in DECODE_DEQUANT_VALUES:
            raise ValueError(
                f"MEMHA_DECODE_DEQUANT={self.decode_dequant!r}: expected one of {DECODE_DEQUANT_VALUES}")
        if self.pipeline and self.kv_format is None:
            raise ValueError("MEMHA_PIPELINE=1 needs MEMHA_KV_FORMAT (the per-layer signal comes from "
                             "the plugin's KV pool): set MEMHA_KV_FORMAT=bf16 for an unquantized "
                             "pipelined pool, or fp8_e4m3 etc. on both servers")
        if self.shared_secret is not None and self.kv_format is None:
            raise ValueError("MEMHA_SHARED_SECRET needs MEMHA_KV_FORMAT (the tags ride on the plugin's "
                             "format handshake): set MEMHA_KV_FORMAT on both servers")
        if self.pipeline_min_tokens < 0:
            raise ValueError(f"MEMHA_PIPELINE_MIN_TOKENS={self.pipeline_min_tokens}: expected >= 0")

    @property
    def cpu_compat_enabled(self) -> bool:
        if self.cpu_compat == "auto":
            # SGLang's own switch for its CPU engine (sglang.srt.utils.common.is_cpu).
            return os.environ.get("SGLANG_USE_CPU_ENGINE", "0") == "1"
        return self.cpu_compat == "1"

    @property
    def kv_enabled(self) -> bool:
        return self.kv_format is not None


def load_config() -> MemhaConfig:
    return MemhaConfig(
        cache_dir=os.environ.get("MEMHA_CACHE_DIR") or os.path.expanduser("~/.cache/sglang-memha"),
        cpu_compat=os.environ.get("MEMHA_CPU_COMPAT", "auto"),
        cpu_kernels=_flag("MEMHA_CPU_KERNELS", True),
        check_kv=_flag("MEMHA_CHECK_KV", False),
        kv_format=os.environ.get("MEMHA_KV_FORMAT") or None,
        k_transform=os.environ.get("MEMHA_K_TRANSFORM") or "none",
        k_offset=os.environ.get("MEMHA_K_OFFSET") or None,
        decode_dequant=os.environ.get("MEMHA_DECODE_DEQUANT") or "deferred",
        pipeline=_flag("MEMHA_PIPELINE", False),
        pipeline_min_tokens=_int("MEMHA_PIPELINE_MIN_TOKENS", 256),
        encode_on_send=_flag("MEMHA_ENCODE_ON_SEND", True),
        shared_secret=_secret(),
    )


def _secret() -> str | None:
    path = os.environ.get("MEMHA_SHARED_SECRET_FILE")
    if path:
        try:
            with open(path) as f:
                value = f.readline().strip()
        except OSError as e:
            raise ValueError(f"MEMHA_SHARED_SECRET_FILE={path!r}: {e.strerror}") from None
        if not value:
            raise ValueError(f"MEMHA_SHARED_SECRET_FILE={path!r}: the file's first line is empty")
        return value
    return os.environ.get("MEMHA_SHARED_SECRET") or None


def _int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer number of tokens") from None


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}: expected 0 or 1")
    return value == "1"


def cache_dir() -> str:
    path = load_config().cache_dir
    os.makedirs(path, exist_ok=True)
    return path
