#!/usr/bin/env bash
# `qwenvl profile --preset qwen-vl-7b` on one GPU: the seed's memory/speed table (LoRA Chat, LoRA Base, Q-LoRA ×
# 384/512/1024/2048 tokens, batch 1, grad-accum 8, one picture per sample, gradient checkpointing as the upstream
# scripts) with random weights of the official sizes built on the GPU in each cell, then the upstream recipe at
# 2048 for the ratio. About 8 minutes on one H100 (measured 2026-11-26: docs/profile.md).
#
#   OUT=gpu-profile bash benchmarks/gpu_profile_7b.sh [path/to/qwen.tiktoken]
#   GRIDS=compiled,loss OUT=gpu-profile bash benchmarks/gpu_profile_7b.sh ...   # the second call (about 5 minutes)
#
# compiled: `--compile` at the longest length, LoRA Chat first (the speed target), then Q-LoRA and LoRA Base, one
# JSON each (each cell compiles its blocks in a fresh process; the inductor cache in /tmp shortens the later ones).
# loss: benchmarks/loss_memory_bench.py on the GPU (the chunked loss's peak memory against the whole one).
#
# One JSON per method (so that a run cut short keeps the methods it finished); the logs in profile.log.
# Runs from the repository root without installing (PYTHONPATH). Merge and render the JSON files with
# `python benchmarks/profile_merge.py OUT/profile-*.json --output ... --markdown ... --plot ...`.
set -u
OUT=${OUT:-gpu-profile}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 COLUMNS=160
PY=${PYTHON:-python3}
VOCAB=${1:-}
PRESET=${PRESET:-qwen-vl-7b}  # PRESET=tiny LENGTHS=64 STEPS=1 tries the script on a CPU
LENGTHS=${LENGTHS:-384,512,1024,2048}
STEPS=${STEPS:-2}
LOG=$OUT/profile.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
vocab_flag=()
[ -n "$VOCAB" ] && vocab_flag=(--vocab "$VOCAB")
GRIDS=${GRIDS:-sanity,lora-chat,qlora,lora-base,baseline}  # which grids to run; also: compiled, loss
grid() {  # grid NAME TIMEOUT_S -- profile flags...
  local name=$1 limit=$2; shift 3
  case ",$GRIDS," in *",$name,"*) ;; *) return ;; esac
  echo "=== $name $(date +%T)" >>"$LOG"
  timeout "$limit" $PY -m qwenvl_cli profile --preset "$PRESET" "${vocab_flag[@]}" --gpu-memory 24GB "$@" \
    --output "$OUT/profile-$name.json" >>"$LOG" 2>&1
  echo "=== $name exit $? $(date +%T)" >>"$LOG"
}
# First, 15 seconds that tell whether training on this GPU works at all with what was built since the last GPU
# run: LoRA on the built-in tiny chat model and demo data, with its evaluation by generation (the frozen
# embeddings looked up in CPU memory, generation finding the model's device). Its summary goes to the log.
case ",$GRIDS," in *",sanity,"*)
  echo "=== sanity $(date +%T)" >>"$LOG"
  timeout 90 $PY -m qwenvl_cli train --method lora --max-steps 10 --eval-every 5 --eval-samples 4 \
    --output "$OUT/sanity-run" >>"$LOG" 2>&1
  echo "=== sanity exit $? $(date +%T)" >>"$LOG"
  rm -rf "$OUT/sanity-run" ;;
esac
grid lora-chat 200 -- --methods lora-chat --lengths "$LENGTHS" --steps "$STEPS" --warmup 1
grid qlora 200 -- --methods qlora --lengths "$LENGTHS" --steps "$STEPS" --warmup 1
grid lora-base 200 -- --methods lora-base --lengths "$LENGTHS" --steps "$STEPS" --warmup 1
grid baseline 150 -- --methods lora-chat --lengths "${LENGTHS##*,}" --steps "$STEPS" --warmup 1 --baseline upstream
for method in lora-chat qlora lora-base; do
  case ",$GRIDS," in *",compiled,"*) GRIDS="$GRIDS,compiled-$method" ;; esac
  grid "compiled-$method" 150 -- --methods "$method" --lengths "${LENGTHS##*,}" --steps "$STEPS" --warmup 1 --compile
done
case ",$GRIDS," in *",loss,"*)
  echo "=== loss $(date +%T)" >>"$LOG"
  timeout 120 $PY benchmarks/loss_memory_bench.py --device cuda --output "$OUT/loss-memory-gpu.json" >>"$LOG" 2>&1
  echo "=== loss exit $? $(date +%T)" >>"$LOG" ;;
esac
tail -n 60 "$LOG"
