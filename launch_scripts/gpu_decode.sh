#!/usr/bin/env bash
# Decode server on the decode host. Requires: pip install 'sglang-memha[gpu]'; source gpu_env.sh
# Quantized KV: export MEMHA_KV_FORMAT=fp8_e4m3 (same on both hosts) and pass --attention-backend memha_triton
# (the only GPU backend that reads the quantized pool; unmeasured on a GPU so far, see README).
set -euo pipefail
: "${MODEL:?source gpu_env.sh first}"
TRANSFER=(--disaggregation-transfer-backend mooncake)
[ -n "${IB_DEVICE:-}" ] && TRANSFER+=(--disaggregation-ib-device "$IB_DEVICE") || TRANSFER=(--disaggregation-transfer-backend mooncake_tcp)
exec python -m sglang.launch_server --model-path "$MODEL" --host 0.0.0.0 --port "$DECODE_PORT" \
  --disaggregation-mode decode "${TRANSFER[@]}" "$@"
