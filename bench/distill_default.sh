#!/usr/bin/env bash
# Makes the draft that ships for the default model (SmolLM2-135M-Instruct), on one GPU, in one
# command of about 9 minutes: the target (in bfloat16, for speed) writes prompts and answers them
# (at most 2.6 minutes), a 2-layer draft is trained on those answers against the float32 target
# (until 7.5 minutes have passed since the start), then it is evaluated on held-out prompts. Runs from a plain checkout; nothing to install.
#
#   bench/distill_default.sh /root/m/SmolLM2-135M-Instruct.Q4_1.gguf [OUT_DIR]
#
# Writes the compact draft, its eval.json and README.md into OUT_DIR (default: $OUT/draft, else
# ./draft), and the log into OUT_DIR/distill.log. To ship it:
#   cp OUT_DIR/{config.json,draft.json,draft_layers.safetensors,draft_vocab.safetensors,eval.json,README.md} \
#      scheduler/speculative/drafts/smollm2-135m-instruct/
set -euo pipefail
target=${1:?usage: bench/distill_default.sh PATH/TO/SmolLM2-135M-Instruct.Q4_1.gguf [OUT_DIR]}
out=${2:-${OUT:-.}/draft}
target=$(realpath "$target")
out=$(realpath -m "$out")
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$out"
# float32 target: greedy outputs with and without speculation are then token-identical (in bfloat16,
# a token verified inside a multi-token query can round differently from one decoded alone).
args=(--target "$target" --out "$out" --layers 2 --tokens 4000000 --max-minutes 7.5 --generation-share 0.35
      --max-num-seqs 512 --max-answer-tokens 256 --epochs 30 --lr 1e-3 --batch-tokens 16384 --top-k 64 --loss kl
      --k 4 --eval-prompts 32 --eval-tokens 128 --eval-speed-prompts 4 --device cuda --dtype float32 --data-dtype bfloat16 --seed 0)
start=$(date +%s)
python3 -m scheduler.distill "${args[@]}" 2>&1 | tee "$out/distill.log"
cat > "$out/README.md" <<README
# Draft for SmolLM2-135M-Instruct

A 2-layer draft in compact form: its own layers only (\`draft_layers.safetensors\`, bfloat16); the
embeddings and LM head are the target's, borrowed at load time after checking the target's
fingerprint (\`draft.json\`). \`beastserve serve --speculative draft\` on the default model uses it.
Held-out evaluation: \`eval.json\`.

Made on $(python3 -c 'import torch; print(torch.cuda.get_device_name(0))') in $(( $(date +%s) - start )) s with

    bench/distill_default.sh SmolLM2-135M-Instruct.Q4_1.gguf

which ran

    python3 -m scheduler.distill $(printf '%q ' "${args[@]}" | sed "s|$target|SmolLM2-135M-Instruct.Q4_1.gguf|; s|$out|OUT_DIR|")
README
echo "draft in $out ($(du -sh "$out/draft_layers.safetensors" | cut -f1) of weights), $(( $(date +%s) - start )) s in all"
