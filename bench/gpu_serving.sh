#!/usr/bin/env bash
# Serving sweep on the GPU machine (issue #6): the daemon with the default model, speculation off and then n-gram
# (adaptive depth), each driven by server/loadgen/load.py over the same chat prompts at several request rates.
#
#   bash bench/gpu_serving.sh MODEL.gguf [OUTDIR]        # OUTDIR defaults to $OUT, else bench/results
#
# Writes OUTDIR/load_gpu_off.{json,md,png}, OUTDIR/load_gpu_ngram.{json,md,png} and OUTDIR/load_gpu.md (the two
# side by side), daemon logs under OUTDIR/logs/. The PNGs only where matplotlib is installed. About 4-5 minutes on
# an H100. Packages missing on the machine (gguf, grpcio-health-checking, grpcio-reflection) are installed from the
# wheels in $WHEELS (default .whl) into /tmp/site when they do not import already.
#
# Settings from the environment: RATES (4,16,64,inf), NUM_REQUESTS (100 per rate), OUTPUT_LEN (256, most tokens per
# answer; answers stop at EOS), DATASET (bench/data/chat_prompts.jsonl), MODES (off,ngram), SERVE_ARGS (extra
# daemon flags), PYTHON (python3).
set -euo pipefail

MODEL=${1:-default}
OUTDIR=${2:-${OUT:-bench/results}}
PYTHON=${PYTHON:-python3}
RATES=${RATES:-4,16,64,inf}
NUM_REQUESTS=${NUM_REQUESTS:-100}
OUTPUT_LEN=${OUTPUT_LEN:-256}
DATASET=${DATASET:-bench/data/chat_prompts.jsonl}
MODES=${MODES:-off,ngram}
SERVE_ARGS=${SERVE_ARGS:-}
WHEELS=${WHEELS:-.whl}

cd "$(dirname "$0")/.."
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUTDIR/logs"

if ! "$PYTHON" -c "import gguf, grpc_health, grpc_reflection" 2>/dev/null; then
    compgen -G "$WHEELS/*.whl" >/dev/null || { echo "missing packages and no wheels in $WHEELS" >&2; exit 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')")
PLOT=$("$PYTHON" -c "import importlib.util as u; print('yes' if u.find_spec('matplotlib') else 'no')")
PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
ADDRESS=127.0.0.1:$PORT
echo "GPU: $GPU · model: $MODEL · rates: $RATES · $NUM_REQUESTS requests per rate · plots: $PLOT"

DAEMON_PID=
stop_daemon() {
    if [[ -n $DAEMON_PID ]] && kill -0 "$DAEMON_PID" 2>/dev/null; then
        kill -TERM "$DAEMON_PID"
        wait "$DAEMON_PID" || echo "daemon $DAEMON_PID exited with $?" >&2
    fi
    DAEMON_PID=
}
trap stop_daemon EXIT

wait_ready() {  # until the readiness service says SERVING, or the daemon dies, or 300 s pass
    "$PYTHON" - "$ADDRESS" "$DAEMON_PID" <<'EOF'
import os, sys, time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.client import READINESS_SERVICE

address, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 300
with grpc.insecure_channel(address) as channel:
    stub = health_pb2_grpc.HealthStub(channel)
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit("the daemon exited before it was ready")
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=READINESS_SERVICE), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
        time.sleep(0.5)
sys.exit("the daemon was not ready after 300 s")
EOF
}

IFS=, read -ra MODE_LIST <<<"$MODES"
COMPARE=()
for MODE in "${MODE_LIST[@]}"; do
    NAME=load_gpu_$MODE
    LOG=$OUTDIR/logs/$NAME.daemon.log
    START=$SECONDS
    # shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
    "$PYTHON" -m server.cli serve --model "$MODEL" --host 127.0.0.1 --port "$PORT" --metrics-port 0 --http-port 0 \
        --speculative "$MODE" $SERVE_ARGS >"$LOG" 2>&1 &
    DAEMON_PID=$!
    wait_ready || { tail -n 40 "$LOG" >&2; exit 1; }
    echo "== $MODE: daemon ready in $((SECONDS - START)) s"
    PLOT_ARGS=()
    [[ $PLOT == yes ]] && PLOT_ARGS=(--plot "$OUTDIR/$NAME.png")
    NOTE="$GPU; model $MODEL in the daemon's default dtype (bfloat16 on CUDA); speculation $MODE"
    [[ $MODE == ngram ]] && NOTE="$NOTE (n-gram drafts, adaptive depth)"
    NOTE="$NOTE; daemon and client on the same machine. The $(wc -l <"$DATASET") chat prompts of $DATASET are reused"
    NOTE="$NOTE in order in every pass, so most prompts after the first few are prefix-cache hits."
    [[ $PLOT == no ]] && NOTE="$NOTE No plot: matplotlib is not installed here."
    "$PYTHON" -m server.loadgen.load --address "$ADDRESS" --dataset jsonl --dataset-path "$DATASET" --chat \
        --output-len "$OUTPUT_LEN" --num-requests "$NUM_REQUESTS" --warmup-requests 4 --sweep "$RATES" \
        --goodput ttft:1000 tpot:50 --timeout 300 --no-progress --note "$NOTE" \
        --out-json "$OUTDIR/$NAME.json" --out-md "$OUTDIR/$NAME.md" "${PLOT_ARGS[@]}"
    stop_daemon
    echo "== $MODE: done in $((SECONDS - START)) s"
    COMPARE+=("$MODE=$OUTDIR/$NAME.json")
done

"$PYTHON" -m server.loadgen.report "${COMPARE[@]}" --out "$OUTDIR/load_gpu.md" \
    --title "Serving load on $GPU: speculation ${MODES//,/ vs }"
echo "total $SECONDS s"
