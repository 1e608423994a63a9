#!/usr/bin/env bash
# Decode server on the decode host. Requires: pip install '.[gpu]' in this repo (AMD: docs/deploy_gpu.md); source gpu_env.sh
# Flags after the script name go to SGLang. Quantized KV, e.g. (docs/deploy_gpu.md has both pairings):
#   --attention-backend memha_triton --page-size 16 --memha-kv-format fp8_e4m3
# memha_triton is the only GPU backend that reads the plugin's pool; nothing of it has run on a GPU yet.
set -euo pipefail
: "${MODEL:?source gpu_env.sh first}"
TRANSFER=(--disaggregation-transfer-backend mooncake)
[ -n "${IB_DEVICE:-}" ] && TRANSFER+=(--disaggregation-ib-device "$IB_DEVICE") || TRANSFER=(--disaggregation-transfer-backend mooncake_tcp)
exec python -m sglang.launch_server --model-path "$MODEL" --host 0.0.0.0 --port "$DECODE_PORT" \
  --disaggregation-mode decode "${TRANSFER[@]}" "$@"
