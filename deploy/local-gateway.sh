#!/usr/bin/env bash
# Daemons behind the smg gateway on this machine: `make gateway` (REPLICAS=2 for two, MODEL=... for another model).
# The OpenAI API is then at http://127.0.0.1:${HTTP_PORT:-8000}/v1; Ctrl-C stops the gateway and the daemons.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-default}
REPLICAS=${REPLICAS:-1}
HTTP_PORT=${HTTP_PORT:-8000}
POLICY=${POLICY:-cache_aware}

pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
workers=()
for ((i = 0; i < REPLICAS; i++)); do
  port=$((50051 + i))
  # The gateway serves HTTP here: the daemons' own HTTP API stays off (its default port is the gateway's).
  "$BIN/beastserve" serve --model "$MODEL" --host 127.0.0.1 --port "$port" --metrics-port $((9400 + i)) \
    --http-port off &
  pids+=($!)
  workers+=("grpc://127.0.0.1:$port")
done
for ((i = 0; i < REPLICAS; i++)); do
  "$BIN/beastserve" health --address "127.0.0.1:$((50051 + i))" --wait 600 >/dev/null
done
echo "gateway: http://127.0.0.1:$HTTP_PORT/v1 -> ${workers[*]} ($POLICY)" >&2
"$BIN/smg" launch --backend vllm --host 127.0.0.1 --port "$HTTP_PORT" --worker-urls "${workers[@]}" \
  --policy "$POLICY" --prometheus-host 127.0.0.1 --prometheus-port "${GATEWAY_METRICS_PORT:-29000}" --log-level warn &
pids+=($!)
wait -n "${pids[@]}"
