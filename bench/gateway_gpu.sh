#!/usr/bin/env bash
# The gateway benchmark on the GPU machine: one load (server/loadgen/load.py, the same client for all three) against
#   grpc     beastserve's own streaming RPC, direct                       (--backend grpc)
#   smg      beastserve behind the smg gateway, OpenAI HTTP API           (--backend openai, smg -> VllmEngine gRPC)
#   vllm     vLLM's own OpenAI server on the same model                   (--backend openai)
# at request rates 4, 16, 64 and unbounded. grpc vs smg is the gateway's own overhead (same daemon, same load);
# smg vs vllm is beastserve behind the gateway against vLLM behind its own HTTP server.
#
#   bash bench/gateway_gpu.sh MODEL_DIR [OUTDIR]          # OUTDIR defaults to $OUT, else bench/results/gateway_h200
#
# MODEL_DIR holds a config.json and the tokenizer files (tokenizer.json, tokenizer_config.json); both engines load
# it with random weights of that shape (--load-format dummy), bfloat16. Writes OUTDIR/gateway_{grpc,smg,vllm}.{json,md}
# (one sweep each), OUTDIR/gateway_{grpc,smg,vllm}_inf_x{1,$CLIENTS}.json, OUTDIR/gateway_overhead.md (grpc vs smg) and OUTDIR/gateway_vs_vllm.md (smg vs vllm) side by side
# per rate, and the servers' logs under OUTDIR/logs/.
#
# Packages: beastserve's missing ones (grpcio-health-checking, grpcio-reflection, smg-grpc-proto, smg) come from
# the wheels in $WHEELS (default .gpu/whl), vLLM and the openai SDK from its bundle (shared/peers/vllm/README.md),
# already unpacked into /tmp/site, and what the bundle lacks for the openai SDK (jiter, httpcore2, truststore) and
# the vLLM OpenAI server (uvicorn, prometheus-fastapi-instrumentator, model-hosting-container-standards, ...) from
# $EXTRA_WHEELS (default .gpu/small);
# all are installed into /tmp/site when they do not import already.
#
# Settings from the environment: PHASES (beastserve,vllm: which servers to run; beastserve = grpc and smg), RATES
# (4,16,64,inf), NUM_REQUESTS (120 per rate), INPUT_LEN (256 words, about one token each), OUTPUT_LEN (128, EOS
# ignored), CLIENTS (4: after each sweep, the unbounded pass again from one client process and then split over
# this many, started together: bench/gateway_clients.py; their lines go to OUTDIR/gateway_clients.txt), SERVE_ARGS /
# VLLM_ARGS (extra flags for each engine), PYTHON (python3).
set -euo pipefail

MODEL=${1:?usage: bench/gateway_gpu.sh MODEL_DIR [OUTDIR]}
OUTDIR=${2:-${OUT:-bench/results/gateway_h200}}
PYTHON=${PYTHON:-python3}
PHASES=${PHASES:-beastserve,vllm}
RATES=${RATES:-4,16,64,inf}
NUM_REQUESTS=${NUM_REQUESTS:-120}
INPUT_LEN=${INPUT_LEN:-256}
OUTPUT_LEN=${OUTPUT_LEN:-128}
SERVE_ARGS=${SERVE_ARGS:-}
VLLM_ARGS=${VLLM_ARGS:-}
WHEELS=${WHEELS:-.gpu/whl}
EXTRA_WHEELS=${EXTRA_WHEELS:-.gpu/small}
CLIENTS=${CLIENTS:-4}
SERVED_NAME=smollm2-135m-dummy

cd "$(dirname "$0")/.."
MODEL=$(realpath "$MODEL")
export PYTHONPATH=".:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0
mkdir -p "$OUTDIR/logs"

install_wheels() {  # DIR MODULE...: install DIR's wheels into /tmp/site unless every MODULE imports already
    local dir=$1; shift
    local imports; imports=$(printf 'import %s;' "$@")
    "$PYTHON" -c "$imports" 2>/dev/null && return 0
    compgen -G "$dir/*.whl" >/dev/null || { echo "cannot import $* and no wheels in $dir" >&2; exit 1; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$dir"/*.whl
}

free_port() { "$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }

PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; fi
    done
    PIDS=()
}
trap stop_all EXIT

wait_http() {  # URL PID SECONDS: until a one-token completion at URL succeeds, or PID dies, or SECONDS pass
    "$PYTHON" - "$@" <<'EOF'
import json, os, sys, time, urllib.request
url, pid, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"process {pid} exited before {url} answered")
    try:
        with urllib.request.urlopen(url + "/models", timeout=5) as r:
            name = json.loads(r.read())["data"][0]["id"]
        body = json.dumps(dict(model=name, prompt="hi", max_tokens=1)).encode()
        req = urllib.request.Request(url + "/completions", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            if json.loads(r.read()).get("choices"):
                sys.exit(0)
    except (OSError, ValueError, KeyError, IndexError):
        pass
    time.sleep(0.5)
sys.exit(f"{url} not serving after {limit} s")
EOF
}

install_wheels "$WHEELS" grpc_health grpc_reflection smg_grpc_proto smg  # the load client needs grpc_health too
# The openai SDK's own needs the bundle lacks (jiter, httpcore2, truststore), and the vLLM OpenAI server's.
install_wheels "$EXTRA_WHEELS" jiter httpcore2 truststore uvicorn prometheus_fastapi_instrumentator \
    model_hosting_container_standards watchfiles python_multipart jmespath supervisor
"$PYTHON" -c "import openai" || { echo "the openai SDK does not import (unpack the vLLM bundle)" >&2; exit 1; }

GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name())")
NOTE_BASE="$GPU; dummy weights of the SmolLM2-135M shape (vocab 49152), bfloat16; synthetic prompts of $INPUT_LEN"
NOTE_BASE="$NOTE_BASE random common words, $OUTPUT_LEN output tokens, EOS ignored, greedy; prefix caching off;"
NOTE_BASE="$NOTE_BASE server and client on the same machine"
COMMON_ARGS=(--input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --ignore-eos --temperature 0
             --num-requests "$NUM_REQUESTS" --goodput ttft:1000 tpot:50 --timeout 300)
LOAD_ARGS=("${COMMON_ARGS[@]}" --warmup-requests 8 --sweep "$RATES" --seed 0 --no-progress)
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    "$PYTHON" --version
    "$PYTHON" -c 'import importlib.metadata as md  # the versions actually imported, /tmp/site first
for name in ("torch", "transformers", "grpcio", "protobuf", "smg", "smg-grpc-proto", "openai", "vllm", "uvicorn"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")' || true
} >"$OUTDIR/versions.txt" 2>&1
echo "GPU: $GPU · model: $MODEL · phases: $PHASES · rates: $RATES · $NUM_REQUESTS requests per rate"

run_load() {  # NAME NOTE BACKEND-ARGS...: the sweep, then the unbounded pass from 1 and from $CLIENTS processes
    local name=$1 note=$2; shift 2
    "$PYTHON" -m server.loadgen.load "$@" "${LOAD_ARGS[@]}" --note "$NOTE_BASE; $note" \
        --out-json "$OUTDIR/gateway_$name.json" --out-md "$OUTDIR/gateway_$name.md"
    local clients
    for clients in 1 $CLIENTS; do
        "$PYTHON" -m bench.gateway_clients --clients "$clients" --name "$name" \
            --out-json "$OUTDIR/gateway_${name}_inf_x$clients.json" -- "$@" "${COMMON_ARGS[@]}" \
            | tee -a "$OUTDIR/gateway_clients.txt"
    done
}

if [[ ,$PHASES, == *,beastserve,* ]]; then
    PORT=$(free_port); HTTP_PORT=$(free_port); PROM_PORT=$(free_port)
    START=$SECONDS
    # shellcheck disable=SC2086  # SERVE_ARGS is a list of flags
    "$PYTHON" -m server.cli serve --model "$MODEL" --load-format dummy --dtype bfloat16 --device cuda \
        --served-model-name "$SERVED_NAME" --host 127.0.0.1 --port "$PORT" --metrics-port 0 --http-port 0 \
        --no-enable-prefix-caching $SERVE_ARGS >"$OUTDIR/logs/beastserve.log" 2>&1 &
    PIDS+=($!)
    "$PYTHON" -m server.cli health --address "127.0.0.1:$PORT" --wait 300 \
        || { tail -n 40 "$OUTDIR/logs/beastserve.log" >&2; exit 1; }
    echo "== beastserve ready in $((SECONDS - START)) s"
    run_load grpc "beastserve's own streaming RPC (GenerateStream), direct" --address "127.0.0.1:$PORT"
    echo "== grpc sweep done at $((SECONDS - START)) s"
    SMG_START=$SECONDS
    "$PYTHON" -c 'import sys; from smg.cli import main; sys.argv[0] = "smg"; sys.exit(main())' launch \
        --host 127.0.0.1 --port "$HTTP_PORT" --worker-urls "grpc://127.0.0.1:$PORT" --backend vllm \
        --policy round_robin --prometheus-host 127.0.0.1 --prometheus-port "$PROM_PORT" \
        >"$OUTDIR/logs/smg.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$HTTP_PORT/v1" "${PIDS[-1]}" 120 || { tail -n 40 "$OUTDIR/logs/smg.log" >&2; exit 1; }
    echo "== smg ready in $((SECONDS - SMG_START)) s"
    run_load smg "beastserve behind smg 1.13.0 (OpenAI completions, streamed; smg -> VllmEngine gRPC)" \
        --backend openai --base-url "http://127.0.0.1:$HTTP_PORT/v1" --model "$SERVED_NAME"
    echo "== smg sweep done at $((SECONDS - START)) s"
    stop_all
    "$PYTHON" -m server.loadgen.report "direct gRPC=$OUTDIR/gateway_grpc.json" "behind smg=$OUTDIR/gateway_smg.json" \
        --out "$OUTDIR/gateway_overhead.md" --title "The gateway's overhead on $GPU: beastserve direct vs behind smg"
fi

if [[ ,$PHASES, == *,vllm,* ]]; then
    VPORT=$(free_port)
    START=$SECONDS
    # shellcheck disable=SC2086  # VLLM_ARGS is a list of flags
    "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --tokenizer "$MODEL" --load-format dummy \
        --dtype bfloat16 --served-model-name "$SERVED_NAME" --host 127.0.0.1 --port "$VPORT" \
        --no-enable-prefix-caching $VLLM_ARGS >"$OUTDIR/logs/vllm.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:$VPORT/v1" "${PIDS[-1]}" 400 || { tail -n 60 "$OUTDIR/logs/vllm.log" >&2; exit 1; }
    echo "== vllm ready in $((SECONDS - START)) s"
    VLLM_VERSION=$("$PYTHON" -c "import vllm; print(vllm.__version__)")
    run_load vllm "vLLM $VLLM_VERSION's own OpenAI server (completions, streamed), its defaults otherwise" \
        --backend openai --base-url "http://127.0.0.1:$VPORT/v1" --model "$SERVED_NAME"
    echo "== vllm sweep done at $((SECONDS - START)) s"
    stop_all
fi

if [[ -f $OUTDIR/gateway_smg.json && -f $OUTDIR/gateway_vllm.json ]]; then
    "$PYTHON" -m server.loadgen.report "beastserve behind smg=$OUTDIR/gateway_smg.json" \
        "vLLM OpenAI server=$OUTDIR/gateway_vllm.json" --out "$OUTDIR/gateway_vs_vllm.md" \
        --title "beastserve behind smg vs vLLM's OpenAI server on $GPU"
fi
echo "total $SECONDS s"
