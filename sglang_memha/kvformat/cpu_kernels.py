"""Fused CPU kernels for the codecs' hot paths, compiled on first use with the system C compiler.

Why C and not torch: the eager reference makes ~10 passes over fp32 temporaries; one fused pass
per row is what gets quantize near memory speed (bf16 rows of a multiple of 32 take an AVX-512 path
where the compiler targets it). The attention read (``fp8_gather_dequantize_bf16``) gathers pool
rows by slot and decodes them in the same pass (rows of a multiple of 16 codes: AVX-512), so a
decode step reads fp8 KV about as fast as stock SGLang gathers bf16 (eval/bench_decode_read.py). Why not a torch C++ extension: compiling against
torch's headers takes about a minute; this plain C file builds in about a second and is called
through ctypes with raw pointers. Built per source and CPU (``-march=native``) into
``$MEMHA_CACHE_DIR/kernels``; where no compiler works, or ``MEMHA_CPU_KERNELS=0``, the codecs use
the torch reference (same bytes, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

logger = logging.getLogger(__name__)
_SRC = os.path.join(os.path.dirname(__file__), "csrc", "fp8_quant.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", "-shared", "-fPIC")
# Calls below this many elements run on one thread. A decode step calls the kernels once per
# request, layer and K/V on a few thousand rows at most (SmolLM2, 400 tokens: 77K elements, ~50 us
# on one core); an OpenMP fork/join there buys little when the box is quiet and, when another
# server holds the other core, each barrier waits for a descheduled thread: measured on the
# 2-core box, a decode step's fp8 reads took 3-6x longer with 2 threads than with 1, and the
# bench_serving TPOT regression of issue 24 followed (eval/RESULTS.md).
PARALLEL_MIN_ELEMENTS = 1 << 20
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = False  # False: not tried yet; None: unavailable


def _cpu_key(flags: tuple[str, ...]) -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l for l in f if l.startswith("flags")), "")
    except OSError:
        cpu = platform.processor()
    src = open(_SRC, "rb").read()
    return hashlib.sha256(src + cpu.encode() + " ".join(flags).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL | None:
    from sglang_memha.config import load_config

    if not load_config().cpu_kernels:
        return None
    return build(FLAGS)


def build(flags: tuple[str, ...] | list[str]) -> ctypes.CDLL | None:
    """Compile (or reuse) the kernels with ``flags`` and load them; None when that fails.

    The codecs use ``FLAGS``; tests also build e.g. ``-mno-avx512f`` to check the portable path.
    """
    from sglang_memha.config import cache_dir

    flags = tuple(flags)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        logger.warning("no C compiler found: KV codecs use the (slower) torch reference on CPU")
        return None
    out_dir = os.path.join(cache_dir(), "kernels")
    os.makedirs(out_dir, exist_ok=True)
    so = os.path.join(out_dir, f"memha_fp8_quant_{_cpu_key(flags)}.so")
    if not os.path.exists(so):
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        r = subprocess.run([cc, *flags, _SRC, "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode != 0:
            os.unlink(tmp)
            logger.warning("building %s failed, using the torch reference: %s", _SRC, r.stderr[-2000:])
            return None
        os.replace(tmp, so)  # atomic: concurrent builders never load a partial file
    lib = ctypes.CDLL(so)
    for name in ("memha_fp8_quant_bf16", "memha_fp8_quant_f32"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    lib.memha_fp8_dequant_bf16.restype = None
    lib.memha_fp8_dequant_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int]
    lib.memha_fp8_gather_dequant_bf16.restype = ctypes.c_int
    lib.memha_fp8_gather_dequant_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                                  ctypes.c_int, ctypes.c_int]
    return lib


def threads_for(elements: int) -> int:
    """OpenMP threads for a kernel call over ``elements`` values: 1 below ``PARALLEL_MIN_ELEMENTS``,
    else torch's intra-op thread count (so ``OMP_NUM_THREADS`` / ``torch.set_num_threads`` still cap it)."""
    return 1 if elements < PARALLEL_MIN_ELEMENTS else torch.get_num_threads()


def get_lib() -> ctypes.CDLL | None:
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _build()
    return _lib


def fp8_quantize_rows(x: torch.Tensor, clamp: float, bias: int, s_min: float,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """Fused fp8 per-(token, kv-head) quantize on CPU (the rule of ``fp8._Fp8TokenHead``).

    x: [T, H, D] bf16 or fp32, CPU. clamp, bias, s_min: the codec's C, exponent bias and smallest
    scale. out: optional preallocated (data uint8 [T, H, D], scale bf16 [T, H, 1]), both contiguous
    (a pool's slot range). Returns (data, scale, number of bad inputs), or None when this input or
    machine is not served (caller falls back).
    """
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float32):
        return None
    lib = get_lib()
    if lib is None:
        return None
    x = x.contiguous()
    t, h, d = x.shape
    if out is None:
        data = torch.empty((t, h, d), dtype=torch.uint8)
        scale = torch.empty((t, h, 1), dtype=torch.bfloat16)
    else:
        data, scale = out
        if (tuple(data.shape) != (t, h, d) or data.dtype != torch.uint8 or not data.is_contiguous()
                or tuple(scale.shape) != (t, h, 1) or scale.dtype != torch.bfloat16
                or not scale.is_contiguous()):
            raise ValueError(f"out=({tuple(data.shape)} {data.dtype}, {tuple(scale.shape)} {scale.dtype}): "
                             f"expected contiguous uint8 {(t, h, d)} and bf16 {(t, h, 1)}")
    fn = lib.memha_fp8_quant_bf16 if x.dtype == torch.bfloat16 else lib.memha_fp8_quant_f32
    bad = fn(x.data_ptr(), data.data_ptr(), scale.data_ptr(), t * h, d, clamp, s_min, bias,
             threads_for(t * h * d))
    return data, scale, int(bad)


def fp8_dequantize_rows_bf16(data: torch.Tensor, scale: torch.Tensor, bias: int) -> torch.Tensor | None:
    """Fused fp8 per-(token, kv-head) dequantize to bf16 on CPU.

    data: uint8 [T, H, D] codes, scale: bf16 [T, H, 1], both CPU. Returns bf16 [T, H, D], or
    None when this input or machine is not served (caller falls back to the torch reference).
    """
    if data.device.type != "cpu" or scale.device.type != "cpu" or scale.dtype != torch.bfloat16:
        return None
    lib = get_lib()
    if lib is None:
        return None
    data, scale = data.contiguous(), scale.contiguous()
    t, h, d = data.shape
    out = torch.empty((t, h, d), dtype=torch.bfloat16)
    lib.memha_fp8_dequant_bf16(data.data_ptr(), scale.data_ptr(), out.data_ptr(), t * h, d, bias,
                               threads_for(t * h * d))
    return out


class Fp8RowGather:
    """``fp8_gather_dequantize_bf16`` bound to one pool layer's buffers (``for_pools``), checked once.

    Why: torch_native attention reads a request's KV per layer and per K/V, so a decode step of
    B requests makes 2 x layers x B calls, often of a few hundred rows each; the buffer checks,
    attribute reads and two torch reductions of the unbound function cost as much as the rows.
    ``reader(slots)`` does only what depends on ``slots``. Holds the buffers (their pointers must
    stay valid), so a pool keeps one reader per layer and K/V for its lifetime.
    """

    def __init__(self, fn, data: torch.Tensor, scales: torch.Tensor, head_dim: int, bias: int):
        self._fn, self._data, self._scales = fn, data, scales
        self._data_ptr, self._scales_ptr = data.data_ptr(), scales.data_ptr()
        self._num_slots, self._heads = data.shape[0], data.shape[1]
        self._head_dim, self._bias = head_dim, bias

    @classmethod
    def for_pools(cls, data: torch.Tensor, scales: torch.Tensor, head_dim: int, bias: int) -> "Fp8RowGather | None":
        """data: uint8 [num_slots, H, head_dim] pool code rows; scales: uint8 [num_slots, H, 2] pool
        scale rows (one bf16 each); both contiguous, CPU. None where these buffers or this machine
        are not served (the caller gathers, then dequantizes)."""
        for t in (data, scales):
            if t.device.type != "cpu" or t.dtype != torch.uint8 or not t.is_contiguous() or t.dim() != 3:
                return None
        if data.shape[2] != head_dim or scales.shape != (*data.shape[:2], 2):
            return None
        lib = get_lib()
        return None if lib is None else cls(lib.memha_fp8_gather_dequant_bf16, data, scales, head_dim, bias)

    def __call__(self, slots) -> torch.Tensor | None:
        """slots: [n] integer CPU tensor of slot ids -> bf16 [n, H, head_dim], the bytes of the
        gather-then-dequantize path; None for other slot kinds. IndexError for a slot out of range."""
        if not torch.is_tensor(slots) or not slots.is_cpu or slots.dim() != 1:
            return None
        slots = slots.to(torch.int64).contiguous()
        n, h, d = slots.shape[0], self._heads, self._head_dim
        out = torch.empty((n, h, d), dtype=torch.bfloat16)
        # The kernel checks the range: two torch reductions here would cost more than small reads.
        if self._fn(self._data_ptr, self._scales_ptr, slots.data_ptr(), n, self._num_slots, h, d, out.data_ptr(),
                    self._bias, threads_for(n * h * d)):
            raise IndexError(f"KV slots out of range [0, {self._num_slots}): "
                             f"min {int(slots.min())}, max {int(slots.max())}")
        return out


def fp8_gather_dequantize_bf16(data: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor, head_dim: int,
                               bias: int) -> torch.Tensor | None:
    """``dequantize(data[slots], scales[slots])`` for fp8 per-(token, kv-head) pool rows, in one
    pass on CPU; buffers and result as ``Fp8RowGather`` (which a caller reading the same buffers
    many times should keep instead). None when this input or machine is not served."""
    reader = Fp8RowGather.for_pools(data, scales, head_dim, bias)
    return None if reader is None else reader(slots)
