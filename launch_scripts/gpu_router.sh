#!/usr/bin/env bash
# The unmodified SGLang router in PD mode. Start it after both servers answer /health.
set -euo pipefail
: "${PREFILL_HOST:?source gpu_env.sh first}"
exec python -m sglang_router.launch_router --pd-disaggregation \
  --prefill "http://$PREFILL_HOST:$PREFILL_PORT" "$BOOTSTRAP_PORT" \
  --decode "http://$DECODE_HOST:$DECODE_PORT" --host 0.0.0.0 --port "$ROUTER_PORT" "$@"
