#!/usr/bin/env bash
# Daemons behind the smg gateway on this machine: `make gateway` (REPLICAS=2 for two, MODEL=... for another model).
# The OpenAI API is then at http://127.0.0.1:${HTTP_PORT:-8000}/v1.
#
# Replica i listens on GRPC_PORT+i (gRPC) and METRICS_PORT+i (/metrics); the defaults stay clear of `make serve`'s
# (50051, 9400), so both can run at once. A port already taken stops the script before anything starts. A replica
# that exits is reported and started again (the gateway routes to the others meanwhile); Ctrl-C (or SIGTERM) stops
# the gateway, drains the daemons and exits 0 when every one of them stopped cleanly.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
MODEL=${MODEL:-default}
REPLICAS=${REPLICAS:-1}
GRPC_PORT=${GRPC_PORT:-50061}
METRICS_PORT=${METRICS_PORT:-9410}
HTTP_PORT=${HTTP_PORT:-8000}
GATEWAY_METRICS_PORT=${GATEWAY_METRICS_PORT:-29000}
POLICY=${POLICY:-cache_aware}
HEALTH_INTERVAL=${HEALTH_INTERVAL:-5}  # seconds between the gateway's health checks of each replica
GATEWAY_GRACE=${GATEWAY_GRACE:-30}  # seconds the gateway gives its requests in flight when stopped
FLAGS=${FLAGS:-}  # more `beastserve serve` flags for every replica

say() { echo "local-gateway: $*" >&2; }

taken() { # whether something on this machine accepts connections on 127.0.0.1:$1
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

for ((i = 0; i < REPLICAS; i++)); do
  for spec in "GRPC_PORT $((GRPC_PORT + i))" "METRICS_PORT $((METRICS_PORT + i))"; do
    set -- $spec
    if taken "$2"; then say "port $2 (replica $i, from $1) is already in use; set $1 to a free range"; exit 1; fi
  done
done
for spec in "HTTP_PORT $HTTP_PORT" "GATEWAY_METRICS_PORT $GATEWAY_METRICS_PORT"; do
  set -- $spec
  if taken "$2"; then say "port $2 ($1) is already in use; set $1 to a free port"; exit 1; fi
done

replicas=()  # replica i's pid
gateway=
start_replica() {
  # The gateway serves HTTP here: the daemons' own HTTP API stays off (its default port is the gateway's).
  # shellcheck disable=SC2086 # FLAGS holds several words
  "$BIN/beastserve" serve --model "$MODEL" --host 127.0.0.1 --port $((GRPC_PORT + $1)) \
    --metrics-port $((METRICS_PORT + $1)) --http-port off $FLAGS &
  replicas[$1]=$!
  say "replica $1 (pid ${replicas[$1]}) on 127.0.0.1:$((GRPC_PORT + $1))"
}

stop() {
  trap - INT TERM
  say "stopping: the gateway, then the replicas (they drain)"
  status=0
  if [[ -n $gateway ]]; then kill -TERM "$gateway" 2>/dev/null || true; wait "$gateway" 2>/dev/null || true; fi
  for pid in "${replicas[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${replicas[@]}"; do wait "$pid" || status=1; done
  exit $status
}
trap stop INT TERM
trap 'kill "${replicas[@]}" $gateway 2>/dev/null || true' EXIT

workers=()
for ((i = 0; i < REPLICAS; i++)); do
  start_replica "$i"
  workers+=("grpc://127.0.0.1:$((GRPC_PORT + i))")
done
for ((i = 0; i < REPLICAS; i++)); do
  until "$BIN/beastserve" health --address "127.0.0.1:$((GRPC_PORT + i))" --wait 10 >/dev/null 2>&1; do
    kill -0 "${replicas[$i]}" 2>/dev/null || { say "replica $i exited while loading"; exit 1; }
  done
done
"$BIN/smg" launch --backend vllm --host 127.0.0.1 --port "$HTTP_PORT" --worker-urls "${workers[@]}" \
  --policy "$POLICY" --prometheus-host 127.0.0.1 --prometheus-port "$GATEWAY_METRICS_PORT" --log-level warn \
  --health-check-interval-secs "$HEALTH_INTERVAL" --health-failure-threshold 1 --no-remove-unhealthy-workers \
  --shutdown-grace-period-secs "$GATEWAY_GRACE" &
gateway=$!
say "gateway (pid $gateway): http://127.0.0.1:$HTTP_PORT/v1 -> ${workers[*]} ($POLICY)"

while true; do
  ended=
  wait -n -p ended "$gateway" "${replicas[@]}" && code=0 || code=$?
  if [[ -z $ended ]]; then continue; fi  # a signal interrupted the wait; its trap runs
  if [[ $ended == "$gateway" ]]; then say "the gateway exited ($code)"; gateway=; exit 1; fi
  for ((i = 0; i < REPLICAS; i++)); do
    if [[ ${replicas[$i]} == "$ended" ]]; then
      say "replica $i (pid $ended) exited ($code); starting it again"
      sleep 1
      start_replica "$i"
    fi
  done
done
