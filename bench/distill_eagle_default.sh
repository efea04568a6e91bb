#!/usr/bin/env bash
# Makes the EAGLE head that ships for the default model (SmolLM2-135M-Instruct), in one command, on
# the GPU or the CPU. The target answers code prompts built from the standard library's and the
# installed packages' functions, chat prompts it writes itself and prose prompts from their docs, and
# reads raw code and docs teacher-forced; a one-layer head is trained on its hidden states, unrolled 4
# draft steps (training-time test); then its acceptance at depth 4 is simulated on held-out code and
# chat (files and prompt seeds training never saw). Nothing is downloaded.
#
#   bench/distill_eagle_default.sh [--device cuda|cpu] [OUT_DIR] [more distill-draft flags...]
#
# cuda (default when a GPU is present): ~3M answer tokens and 2M tokens of raw text, 30 minutes at most, the
# target read live inside training. On a leased machine whose calls are short, use
# bench/distill_eagle_gpu.sh instead: the same run as resumable calls of a few minutes each.
# cpu: a small budget, 40 minutes at most, the target's features cached on disk (one thread each: OpenMP
# threads that wait on each other on a busy machine cost more than they give). Flags after OUT_DIR
# override the budget, e.g.
#   bench/distill_eagle_default.sh --device cpu /tmp/head --max-minutes 3 --tokens 400 --text-tokens 2000
# A run stopped part way carries on with the same command and --resume.
# Writes the head (head.json, head.safetensors, draft_vocab.safetensors), eval.json, README.md and
# distill.log into OUT_DIR (default: $OUT/eagle-head, else ./eagle-head). To ship it:
#   cp OUT_DIR/{head.json,head.safetensors,draft_vocab.safetensors,eval.json,README.md} \
#      scheduler/speculative/heads/smollm2-135m-instruct/
set -euo pipefail
device=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")' 2>/dev/null || echo cpu)
if [[ ${1:-} == --device ]]; then device=$2; shift 2; fi
out=${1:-${OUT:-.}/eagle-head}
shift || true
out=$(realpath -m "$out")
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
common=(--kind eagle --target default --out "$out" --unroll 4 --k 4 --top-k 32
        --temperatures 0,0.7 --answer-shares code=4,chat=4,prose=2 --eval-tokens 128 --lr 1e-3 --seed 0)
if [[ $device == cuda* ]]; then
  # bfloat16 writes the answers faster; the target read for the hidden states and logits is float32.
  budget=(--device "$device" --dtype float32 --data-dtype bfloat16 --tokens 3000000 --text-tokens 2000000
          --max-answer-tokens 256 --max-num-seqs 512 --max-files 20000 --scan-seconds 60 --batch-tokens 16384
          --epochs 8 --draft-vocab 16384 --eval-prompts 32 --features live
          --max-minutes 30 --phases answers=0.3,train=0.65,eval=0.05)
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  budget=(--device cpu --dtype float32 --tokens 20000 --text-tokens 30000 --max-answer-tokens 128
          --max-num-seqs 32 --max-files 2000 --scan-seconds 60 --batch-tokens 2048 --epochs 10 --max-minutes 40
          --draft-vocab 8192 --eval-prompts 16 --features cache
          --phases answers=0.35,read=0.2,train=0.4,eval=0.05)
fi
extra=$(printf ' %q' "$@")
args=("${common[@]}" "${budget[@]}" "$@")
start=$(date +%s)
python3 -m scheduler.distill "${args[@]}" 2>&1 | tee -a "$out/distill.log"
machine=$(python3 -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")')
cat > "$out/README.md" <<README
# EAGLE head for SmolLM2-135M-Instruct

One decoder layer that drafts from the target's hidden states after layers $(python3 -c "import json; print(json.load(open('$out/head.json'))['config']['layer_ids'])") (\`head.safetensors\`,
bfloat16; the embeddings and LM head are the target's, borrowed at load time after checking the
target's fingerprint in \`head.json\`), proposing the $(python3 -c "import json; print(json.load(open('$out/eval.json'))['head_vocab'])") tokens of \`draft_vocab.safetensors\`.
\`beastserve serve --speculative eagle\` (or \`best\`) on the default model uses it.
Held-out acceptance (simulated, depth 4, greedy) and the training data: \`eval.json\`.

Made on $machine in $(( $(date +%s) - start )) s with

    bench/distill_eagle_default.sh --device $device OUT_DIR${extra}

which ran

    python3 -m scheduler.distill $(printf '%q ' "${args[@]}" | sed "s|$out|OUT_DIR|")
README
echo "head in $out ($(du -sh "$out/head.safetensors" | cut -f1) of weights), $(( $(date +%s) - start )) s in all"
