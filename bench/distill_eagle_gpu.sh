#!/usr/bin/env bash
# The default model's EAGLE head made on a leased GPU machine whose calls are short (at most 10 minutes
# each, the machine bare at every start, 64 MiB carried in and 8 files of 16 MiB or less, 64 MiB in
# all, back): bench/distill_eagle_default.sh's CUDA run cut into resumable calls of 8 minutes.
#
# 1. Here, once (CPU, a few minutes; no model is run): read the local code and docs into one prompts
#    file, with the held-out split by file hash (the machine that answers never scans a disk):
#      bench/distill_eagle_gpu.sh prepare
#    -> .gpu/eagle/sources.json.gz (~10 MiB; .gpu/ is git-ignored)
# 2. On the device, call 1 (carry: [".gpu/eagle"]; timeout_s 600):
#      bench/distill_eagle_gpu.sh call
#    answers phase (the target answers code, chat and prose prompts, 512 sequences at once, bfloat16),
#    then training with the target read live inside the loop, then the held-out simulation. $OUT gets
#    the head (head.json, head.safetensors, draft_vocab.safetensors), eval.json, distill.log and the
#    run's state (its samples and the checkpoint without the optimiser's moments) as state.tar.part-*,
#    parts of 15 MiB: 7 files, ~36 MB for 5 M tokens of data.
# 3. Here: put what came back where the next call finds it (the state parts into .gpu/eagle, the head
#    and its report into .gpu/eagle-head, not carried):
#      bench/distill_eagle_gpu.sh collect FILES_AT     # the reply's files_at
# 4. On the device, call 2 (and more, the same way; carry: [".gpu/eagle"]):
#      bench/distill_eagle_gpu.sh call
#    The state is unpacked and the run resumed (--resume): its data is made, so the whole call trains;
#    the learning rate decays over --train-minutes-total (the training minutes CALLS calls give) across them.
# Two calls take about 22 of a session's 30 device minutes (each call's start included).
# The head that came back last ships as bench/distill_eagle_default.sh says, if it beats the draft
# through the engine (python -m bench.eagle_eval --eagle-head .gpu/eagle-head).
#
# Environment: CALLS (calls planned, default 2), MINUTES (one call's cap, default 8), OUT (the
# device's $OUT), DEVICE (default cuda; cpu rehearses the plan here with small flags, e.g.
#   DEVICE=cpu MINUTES=2 OUT=/tmp/o bench/distill_eagle_gpu.sh call --tokens 300 --text-tokens 2000 \
#     --max-num-seqs 16 --batch-tokens 1024 --draft-vocab 4096 --eval-prompts 4 --eval-tokens 32).
# Flags after the verb go to distill-draft.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
carry=.gpu/eagle
verb=${1:?usage: bench/distill_eagle_gpu.sh prepare|call|collect FILES_AT [distill-draft flags...]}
shift
python=${PYTHON:-python3}
calls=${CALLS:-2}
minutes=${MINUTES:-8}
device=${DEVICE:-cuda}
# Training minutes over all calls: train's share of what answers leave (0.5 / 0.55 of 0.55) in call 1, of
# the whole call (less the model's load) in later ones, whose answers are made.
train_total=$(awk "BEGIN { print 0.5 * $minutes + 0.88 * $minutes * ($calls - 1) }")
data=(--tokens 3000000 --text-tokens 2000000 --max-files 20000)

case $verb in
prepare)
  mkdir -p "$carry"
  $python -m scheduler.distill --kind eagle --stage data --out "$carry" "${data[@]}" --scan-seconds 600 "$@"
  ;;
call)
  run=/tmp/eagle-run
  mkdir -p "$run"
  resume=()
  if compgen -G "$carry/state.tar.part-*" > /dev/null; then
    cat "$carry"/state.tar.part-* | tar -x -C "$run"
    resume=(--resume)
  else
    resume=(--prompts-from "$carry/sources.json.gz")
  fi
  # One call: --max-minutes for the run itself, inside the 10-minute limit with the imports, the model's
  # loads, packing and the transfers.
  $python -m scheduler.distill --kind eagle --target default --out "$run" --device "$device" --dtype float32 \
    --data-dtype bfloat16 "${data[@]}" --unroll 4 --k 4 --top-k 32 --temperatures 0,0.7 \
    --answer-shares code=4,chat=4,prose=2 --max-answer-tokens 256 --max-num-seqs 512 --batch-tokens 16384 \
    --epochs 40 --draft-vocab 16384 --eval-prompts 32 --eval-tokens 128 --lr 1e-3 --seed 0 --features live \
    --max-minutes "$minutes" --phases answers=0.45,train=0.5,eval=0.05 \
    --train-minutes-total "$train_total" "${resume[@]}" "$@" 2>&1 | tee -a "$run/distill.log"
  $python -c "import sys; from pathlib import Path; from scheduler.distill.eagle_train import strip_checkpoint
print('checkpoint carried:', strip_checkpoint(Path(sys.argv[1])), 'bytes')" "$run/checkpoint.pt"
  out=${OUT:?OUT: the folder whose files come back}
  cp "$run"/{head.json,head.safetensors,draft_vocab.safetensors,eval.json,distill.log} "$out"/
  tar -c -C "$run" checkpoint.pt draft_vocab.safetensors data/train.npz data/held_out.jsonl data/sources.json \
    | split -b 15M - "$out/state.tar.part-"
  ls -l "$out"
  ;;
collect)
  from=${1:?collect: the folder the files of the call came back in}
  rm -f "$carry"/state.tar.part-*
  mkdir -p "$carry-head"  # beside the carried folder: the head needs no second trip
  cp "$from"/state.tar.part-* "$carry"/
  cp "$from"/{head.json,head.safetensors,draft_vocab.safetensors,eval.json,distill.log} "$carry-head"/
  cat "$carry-head/distill.log" >> "$carry-head/distill-all.log"
  du -sh "$carry" "$carry-head"
  ;;
*)
  echo "unknown verb $verb (prepare, call, collect)" >&2
  exit 2
  ;;
esac
