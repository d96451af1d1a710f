#!/usr/bin/env bash
# The GPU half of `qwenvl train`'s checks: real bf16/fp16 steps of every method, DeepSpeed on one GPU (the
# upstream script fails there with 'DummyOptim' object has no attribute 'step'), and FSDP (which a CPU cannot
# run: accelerate turns it into DDP there). Tiny models built here; a few minutes on one H100.
#
#   bash benchmarks/gpu_train_check.sh            # writes $OUT (default ./gpu-check) /gpu_train_check.json + logs
#
# Runs from the repository root without installing (PYTHONPATH); a step whose package is missing (deepspeed,
# bitsandbytes) is recorded as skipped with the reason, never as passed.
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export QWENVL_CACHE_DIR=$OUT/cache
PY=${PYTHON:-python3}
WORK=$(mktemp -d)
RESULTS=$OUT/steps.jsonl
: >"$RESULTS"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT/gpu.txt" 2>&1
$PY benchmarks/versions.py >"$OUT/versions.txt" 2>&1

DEADLINE=$(( $(date +%s) + ${BUDGET_S:-100000} ))  # BUDGET_S: steps not started by then are recorded as not run
step() {  # step NAME NEEDS_MODULE -- command...
  local name=$1 needs=$2; shift 3
  if [ "$(date +%s)" -ge "$DEADLINE" ]; then
    echo "{\"step\": \"$name\", \"status\": \"not run\", \"reason\": \"out of time (BUDGET_S)\"}" >>"$RESULTS"
    return
  fi
  if [ "$needs" != "-" ] && ! $PY -c "import $needs" >/dev/null 2>&1; then
    echo "{\"step\": \"$name\", \"status\": \"skipped\", \"reason\": \"$needs is not installed\"}" >>"$RESULTS"
    return
  fi
  local started=$(date +%s.%N) limit=$(( DEADLINE - $(date +%s) ))
  [ "$limit" -gt 120 ] && limit=120  # no step runs past BUDGET_S
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$? ended=$(date +%s.%N)
  local seconds=$(awk "BEGIN {printf \"%.1f\", $ended - $started}")
  local summary=$(grep -E "final loss|samples/s|memory|Error|error:" "$OUT/$name.log" | tail -4 | tr '\n"' ' \047')
  echo "{\"step\": \"$name\", \"status\": \"$(case $rc in 0) echo passed ;; 124) echo "timed out ($limit s)" ;; *) echo failed ;; esac)\", \"rc\": $rc, \"seconds\": $seconds, \"summary\": \"$summary\"}" >>"$RESULTS"
}

Q="$PY -m qwenvl_cli"
$Q init-model --preset tiny --output "$WORK/tiny" >/dev/null
$Q init-model --preset tiny-base --output "$WORK/tiny-base" >/dev/null
$Q init-model --preset tiny-qwen2.5-vl --output "$WORK/tiny-vl" >/dev/null
$Q data synth --output "$WORK/colours" --n 840 --image-size 56 --eval-fraction 0.0477 --max-shapes 1 --questions colour >/dev/null
DATA="--data $WORK/colours/train.json --eval-data $WORK/colours/eval.json"
FAST="--max-steps 8 --batch-size 8 --grad-accum 1 --save-steps 4"

# Most telling first (with BUDGET_S the tail may not run): the steps that never ran on a GPU, then the newer
# families' code on a GPU (tiny Qwen2.5-VL: LoRA with --packing in bf16, Q-LoRA NF4), then those that passed on
# the H100 (2026-11-26: full bf16, FSDP full, LoRA fp16, Q-LoRA NF4 fp16).
step fsdp-lora-1gpu - -- $Q train --method lora --engine fsdp --gradient-checkpointing --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-fsdp-lora"
step lora-base-bf16 - -- $Q train --method lora --model "$WORK/tiny-base" $DATA $FAST --output "$WORK/r-lora-base"
step packing-bf16 - -- $Q train --method full --packing --max-length 1024 --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-pack"
step deepspeed-zero2-1gpu deepspeed -- $Q train --engine deepspeed --zero 2 --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-ds2"
step deepspeed-zero3-1gpu deepspeed -- $Q train --method full --engine deepspeed --zero 3 --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-ds3"
step fsdp-full-1gpu - -- $Q train --method full --engine fsdp --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-fsdp"
for run in r-fsdp r-ds3; do  # the sharded runs wrote complete models: they load and answer
  step "eval-$run" - -- $Q eval --model "$WORK/$run" --data "$WORK/colours/eval.json" --limit 20
done
step learning-test - -- $PY -m pytest -q -x -p no:cacheprovider tests/test_learning.py
step family-lora-packing-bf16 - -- $Q train --method lora --packing --max-length 1024 --precision bf16 --model "$WORK/tiny-vl" $DATA $FAST --output "$WORK/r-vl-lora"
step family-qlora-nf4 bitsandbytes -- $Q train --method qlora --quant nf4 --model "$WORK/tiny-vl" $DATA $FAST --output "$WORK/r-vl-qlora"
step eval-r-vl-lora - -- $Q eval --model "$WORK/r-vl-lora" --data "$WORK/colours/eval.json" --limit 20
step full-bf16 - -- $Q train --method full --precision bf16 --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-full"
step lora-fp16 - -- $Q train --method lora --precision fp16 --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-lora-fp16"
step qlora-nf4-fp16 bitsandbytes -- $Q train --method qlora --quant nf4 --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-qlora"
step lora-bf16 - -- $Q train --method lora --precision bf16 --model "$WORK/tiny" $DATA $FAST --output "$WORK/r-lora"
step qlora-bf16-refused - -- bash -c "! $Q train --method qlora --quant nf4 --precision bf16 --model $WORK/tiny --output $WORK/r-x"
step eval-r-full - -- $Q eval --model "$WORK/r-full" --data "$WORK/colours/eval.json" --limit 20

$PY - "$RESULTS" "$OUT" <<'EOF'
import json, sys, pathlib
steps = [json.loads(line) for line in open(sys.argv[1])]
out = pathlib.Path(sys.argv[2])
report = {"gpu": (out / "gpu.txt").read_text().strip(), "versions": (out / "versions.txt").read_text().splitlines(), "steps": steps}
(out / "gpu_train_check.json").write_text(json.dumps(report, indent=2) + "\n")
for s in steps:
    print(f"{s['status']:8s} {s['step']:24s} {s.get('seconds', '')} {s.get('reason', s.get('summary', ''))[:150]}")
EOF
rm -rf "$WORK"
