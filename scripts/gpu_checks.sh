#!/usr/bin/env bash
# GPU checks, for a session lent a CUDA machine: the Triton kernels and the pipeline's CUDA-event
# marker and the decode-attention kernel against the torch references (tests marked `gpu`), then
# the Triton bandwidth bench, the decode-attention bench, and the simulator's GPU calibration
# (eval.sim.gpu_measure: one Qwen3-8B layer's GEMMs and attention + nvidia-smi power; gpu_fit).
# Needs torch + triton + pytest (+ pytest-xdist, hypothesis); no SGLang, no network.
#   scripts/gpu_checks.sh [OUTDIR]     -> OUTDIR/{device.txt,pytest_gpu.log,codecs_gpu.json,...}
set -u
out=${1:-${OUT:-/tmp/memha-gpu-checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} MEMHA_CACHE_DIR=/tmp/memha-cache
py=${PYTHON:-python3}
date -u | tee "$out/device.txt"
nvidia-smi -L | tee -a "$out/device.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  | tee -a "$out/device.txt"
timeout 300 $py -m pytest -q -p no:cacheprovider -n 8 -m gpu tests/kvformat/test_triton.py tests/kvformat/test_codecs_cuda.py tests/quant/test_layer_signal.py tests/attention/test_decode_kernel.py \
  >"$out/pytest_gpu.log" 2>&1
echo "pytest rc=$?"; tail -25 "$out/pytest_gpu.log"
timeout 240 $py eval/bench_codecs.py --gpu-only --out "$out/codecs_gpu.json" 2>&1 | tee "$out/bench_codecs_gpu.log"
echo "bench rc=${PIPESTATUS[0]}"
timeout 240 $py eval/bench_decode_attention.py --out "$out/decode_attention_gpu.json" 2>&1 | tee "$out/bench_decode_attention_gpu.log"
echo "decode bench rc=${PIPESTATUS[0]}"
timeout 150 $py -m eval.sim.gpu_measure --out "$out/sim_gpu_measure.json" 2>&1 | tee "$out/sim_gpu_measure.log"
echo "sim measure rc=${PIPESTATUS[0]}"
timeout 60 $py -m eval.sim.gpu_fit "$out/sim_gpu_measure.json" --out "$out/sim_gpu.json" 2>&1 | tee "$out/sim_gpu_fit.log"
echo "sim fit rc=${PIPESTATUS[0]}"
