#!/usr/bin/env bash
# `qwenvl profile --preset qwen-vl-7b` on one GPU: the seed's memory/speed table (LoRA Chat, LoRA Base, Q-LoRA ×
# 384/512/1024/2048 tokens, batch 1, grad-accum 8, one picture per sample, gradient checkpointing as the upstream
# scripts) with random weights of the official sizes built on the GPU in each cell, the upstream recipe at 2,048
# for the ratio, and `--compile`. Grids run most telling first, so that a call cut short (a device lent for 15
# minutes, 10 per command) still has the targets:
#
#   sanity              15 s: LoRA on the tiny demo with evaluation by generation (the GPU works with this code)
#   targets             the three methods at 2,048 tokens (every target of issue 6 is a 2,048 cell)
#   trace               LoRA Chat at 2,048 with --trace: one more step (2 micro-batches, to keep the file small)
#                       under torch.profiler: how busy the GPU was, where the host waited, the busiest kernels
#   compiled-lora-chat  LoRA Chat at 2,048 with --compile (the speed target)
#   baseline            LoRA Chat at 2,048, qwenvl and --recipe upstream in one grid (same-session ratio)
#   rest                the three methods at the shorter lengths (the rest of the table and the chart)
#   compiled-qlora, compiled-lora-base   --compile at 2,048
#   loss                benchmarks/loss_memory_bench.py on the GPU (chunked against whole loss)
#   family-lora         LoRA at 2,048 on the official sizes of Qwen2.5-VL-7B and Qwen3-VL-8B (FAMILY_PRESETS)
#   family-qlora        Q-LoRA (NF4) at 2,048 on the same
#
# The family grids come last in the default list, so a 540-s call rarely reaches them; run them alone with
#   GRIDS=family-lora,family-qlora OUT=gpu-profile-family bash benchmarks/gpu_profile_7b.sh
# (no vocabulary argument: the family presets carry their own; their result states each sample's picture tokens).
#
#   OUT=gpu-profile bash benchmarks/gpu_profile_7b.sh [path/to/qwen.tiktoken]
#   GRIDS=rest,compiled-qlora,compiled-lora-base,loss OUT=... bash benchmarks/gpu_profile_7b.sh ...  # what is left
#
# BUDGET_S (default 540) bounds the whole call: a grid is not started with less than 60 s left, and none runs
# past the budget; profile rewrites its JSON after every cell, so a grid cut short keeps its finished cells. One
# JSON per grid, the logs in profile.log. Runs from the repository root without installing (PYTHONPATH). Merge
# and render with `python benchmarks/profile_merge.py OUT/profile-targets.json OUT/profile-baseline.json
# OUT/profile-rest.json --output ... --markdown ... --plot ...` (the first file's cell wins), the compiled
# grids likewise into a second result. PRESET=tiny LENGTHS=384 STEPS=1 tries the script on a CPU.
set -u
OUT=${OUT:-gpu-profile}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 COLUMNS=160
PY=${PYTHON:-python3}
VOCAB=${1:-}
PRESET=${PRESET:-qwen-vl-7b}
LENGTHS=${LENGTHS:-384,512,1024,2048}
LONGEST=${LENGTHS##*,}
SHORTER=${LENGTHS%,*}
STEPS=${STEPS:-2}
LOG=$OUT/profile.log
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-540} ))
GRIDS=${GRIDS:-sanity,targets,trace,compiled-lora-chat,baseline,rest,compiled-qlora,compiled-lora-base,loss,family-lora,family-qlora}
FAMILY_PRESETS=${FAMILY_PRESETS:-qwen2.5-vl-7b qwen3-vl-8b}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
vocab_flag=()
[ -n "$VOCAB" ] && vocab_flag=(--vocab "$VOCAB")

start() {  # start NAME LIMIT_S: whether to run grid NAME now; sets $limit to what it may take
  local name=$1 left=$(( DEADLINE - $(date +%s) ))
  case ",$GRIDS," in *",$name,"*) ;; *) return 1 ;; esac
  if [ "$left" -lt 60 ]; then
    echo "=== $name not run: $left s of BUDGET_S left" >>"$LOG"
    return 1
  fi
  limit=$(( $2 < left ? $2 : left ))
  echo "=== $name $(date +%T) (at most $limit s)" >>"$LOG"
}
grid() {  # grid NAME LIMIT_S -- profile flags...
  local name=$1 cap=$2; shift 3
  start "$name" "$cap" || return 0
  timeout "$limit" $PY -m qwenvl_cli profile --preset "$PRESET" "${vocab_flag[@]}" --gpu-memory 24GB \
    --steps "$STEPS" --warmup 1 "$@" --output "$OUT/profile-$name.json" >>"$LOG" 2>&1
  echo "=== $name exit $? $(date +%T)" >>"$LOG"
}
family_grid() {  # family_grid NAME LIMIT_S -- profile flags...: one grid per preset of FAMILY_PRESETS
  local name=$1 cap=$2 preset; shift 3
  start "$name" "$cap" || return 0
  for preset in $FAMILY_PRESETS; do
    left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -lt 60 ] && { echo "=== $name $preset not run: $left s left" >>"$LOG"; continue; }
    timeout $(( limit < left ? limit : left )) $PY -m qwenvl_cli profile --preset "$preset" --gpu-memory 24GB \
      --steps "$STEPS" --warmup 1 "$@" --output "$OUT/profile-$name-$preset.json" \
      --markdown "$OUT/profile-$name-$preset.md" >>"$LOG" 2>&1
    echo "=== $name $preset exit $? $(date +%T)" >>"$LOG"
  done
}

if start sanity 90; then
  timeout "$limit" $PY -m qwenvl_cli train --method lora --max-steps 10 --eval-every 5 --eval-samples 4 \
    --output "$OUT/sanity-run" >>"$LOG" 2>&1
  echo "=== sanity exit $? $(date +%T)" >>"$LOG"
  rm -rf "$OUT/sanity-run"
fi
grid targets 200 -- --methods lora-chat,lora-base,qlora --lengths "$LONGEST"
grid trace 120 -- --methods lora-chat --lengths "$LONGEST" --grad-accum 2 --steps 1 --trace "$OUT/traces"
grid compiled-lora-chat 180 -- --methods lora-chat --lengths "$LONGEST" --compile
grid baseline 150 -- --methods lora-chat --lengths "$LONGEST" --baseline upstream
[ "$SHORTER" != "$LENGTHS" ] && grid rest 360 -- --methods lora-chat,lora-base,qlora --lengths "$SHORTER"
grid compiled-qlora 150 -- --methods qlora --lengths "$LONGEST" --compile
grid compiled-lora-base 150 -- --methods lora-base --lengths "$LONGEST" --compile
if start loss 120; then
  timeout "$limit" $PY benchmarks/loss_memory_bench.py --device cuda --output "$OUT/loss-memory-gpu.json" >>"$LOG" 2>&1
  echo "=== loss exit $? $(date +%T)" >>"$LOG"
fi
family_grid family-lora 240 -- --methods lora-chat --lengths "$LONGEST"
family_grid family-qlora 240 -- --methods qlora --lengths "$LONGEST"
grep "^===" "$LOG"
