#!/usr/bin/env bash
# Build the CPU environment for sglang-memha from nothing: a virtual env with CPU torch 2.13.0,
# SGLang 0.5.23 without its CUDA-only requirements, sglang-router, Mooncake (non-CUDA build),
# the Debian libraries Mooncake's engine.so links, and this package (editable, so the
# `sglang.srt.plugins` entry point is registered).
#
# Idempotent: a stamp file records a hash of this script and pyproject.toml; when both are
# unchanged and the venv imports, the script exits in about a second.
#
# Env: VENV (default ./.venv), MEMHA_SETUP_EXTRAS (default "dev"), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${MEMHA_SETUP_EXTRAS:-dev}
SGLANG_VERSION=0.5.23
ROUTER_VERSION=0.3.2
MOONCAKE_VERSION=0.3.13.post1
TORCH_VERSION=2.13.0
STAMP=$VENV/.memha-setup-stamp
HASH=$(cat "$0" pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS
t(){ local s=$(date +%s); "$@"; echo "[setup] $(( $(date +%s)-s ))s: $*" >&2; }

debian_libs() {
  # Mooncake's engine.so needs libibverbs.so.1, libnl-3.so.200, libnl-route-3.so.200 even for TCP.
  if ldconfig -p | grep -q 'libibverbs.so.1 '; then return; fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    t apt-get install -y -q libibverbs1 libnl-3-200 libnl-route-3-200 >/dev/null \
      || { apt-get update -q >/dev/null && t apt-get install -y -q libibverbs1 libnl-3-200 libnl-route-3-200 >/dev/null; }
  else
    echo "[setup] not root: install libibverbs1 libnl-3-200 libnl-route-3-200 with your package manager" >&2
    exit 1
  fi
}

debian_libs
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$HASH" ] \
   && SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c "import sglang, sglang_router, mooncake.engine, sglang_memha" 2>/dev/null; then
  echo "[setup] environment up to date: $VENV"
  exit 0
fi

[ -x "$VENV/bin/python" ] || t "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
DL=$VENV/.memha-dl; mkdir -p "$DL"
echo "torch==$TORCH_VERSION" > "$DL/constraints.txt"

# 1) CPU torch. Where pip's find-links holds the CPU wheel (this machine kind), take it; elsewhere
#    use the PyTorch CPU index so that no CUDA wheels are pulled.
if "${PIP[@]}" download -q --no-deps --no-index "torch==$TORCH_VERSION" -d "$DL/torch" >/dev/null 2>&1; then
  t "${PIP[@]}" install -q "$DL"/torch/torch-*.whl
else
  t "${PIP[@]}" install -q "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
fi

# 2) SGLang's own requirements minus torch (it pins a CUDA-only 2.14.1) and every CUDA-only package.
[ -f "$DL"/sglang-$SGLANG_VERSION-*.whl ] 2>/dev/null || ls "$DL"/sglang-$SGLANG_VERSION-*.whl >/dev/null 2>&1 \
  || t "${PIP[@]}" download -q --no-deps "sglang==$SGLANG_VERSION" -d "$DL"
WHEEL=$(ls "$DL"/sglang-$SGLANG_VERSION-*.whl | head -1)
"$VENV/bin/python" - "$WHEEL" > "$DL/sglang-cpu-reqs.txt" <<'PY'
import re, sys, zipfile
CUDA_ONLY = {"torch", "torchaudio", "torchvision", "torchcodec", "timm", "flashinfer_python",
             "flashinfer-python", "cuda-python", "nvidia-cutlass-dsl", "nvidia-mathdx",
             "nvshmem4py-cu13", "sgl-deep-ep", "sgl-deep-gemm", "sgl-flash-mla", "sglang-kernel",
             "quack-kernels", "flash-attn-4", "humming-kernels", "tilelang", "torch_memory_saver",
             "av", "decord2"}
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:") or "extra ==" in line:
        continue
    req = line.split(":", 1)[1].strip()
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    if name.lower() not in {n.lower() for n in CUDA_ONLY}:
        print(req)
PY
t "${PIP[@]}" install -q -r "$DL/sglang-cpu-reqs.txt" -c "$DL/constraints.txt"

# 3) SGLang itself, the router, torchvision (its CUDA-linked _C.so does not load; the plugin's
#    CPU compat defines the op schemas transformers needs), Mooncake without CUDA.
t "${PIP[@]}" install -q --no-deps "$WHEEL" "sglang-router==$ROUTER_VERSION" torchvision==0.28.0
t "${PIP[@]}" install -q "mooncake-transfer-engine-non-cuda==$MOONCAKE_VERSION" -c "$DL/constraints.txt"

# 4) This package, editable, with its extras; constraints keep CPU torch.
t "${PIP[@]}" install -q --no-deps -e .
# The CPU boot hooks (sgl_kernel stand-in, torchvision op schemas) must exist before SGLang's
# plugin loader runs, so they start from a .pth (see sglang_memha/sglang_ext/cpu/cpu_boot.py).
"$VENV/bin/python" -m sglang_memha.sglang_ext.cpu.cpu_boot --install >/dev/null
if [ -n "$EXTRAS" ]; then
  EXTRA_REQS=$("$VENV/bin/python" - "$EXTRAS" <<'PY'
import sys, tomllib
opt = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]
print("\n".join(r for e in sys.argv[1].split(",") for r in opt[e]))
PY
)
  echo "$EXTRA_REQS" > "$DL/extras.txt"
  t "${PIP[@]}" install -q -r "$DL/extras.txt" -c "$DL/constraints.txt"
fi
SGLANG_USE_CPU_ENGINE=1 "$VENV/bin/python" -c "import sglang, sglang_router, mooncake.engine, sglang_memha; print('[setup] ok: sglang', sglang.__version__)"
echo "$HASH" > "$STAMP"
du -sh "$VENV" 2>/dev/null || true
