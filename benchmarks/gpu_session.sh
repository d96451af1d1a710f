#!/usr/bin/env bash
# A lent GPU's whole session in one call (issue 16): the 7B-size profile (targets, a torch.profiler trace, the
# compiled step, the upstream ratio, the newer families at 7B/8B), packing against dynamic padding on mixed
# lengths at the 7B size, and the training checks that never ran on a GPU, most telling first, within
# BUDGET_S; then everything packed into $OUT as four files (the device tool brings back 8 at most).
#
#   python benchmarks/gpu_wheels.py              # here, once: .whl/ (git-ignored, 26 MiB) and its check
#   run: carry [".whl"], timeout_s 600, command:
#     OUT=$OUT bash benchmarks/gpu_session.sh     # → summary.txt, session.tgz, session.log, versions.txt
#   a second call at once (the machine is still warm), for what the first did not reach:
#     OUT=$OUT STEPS_LEFT=packing,check GRIDS=rest,family-qlora BUDGET_S=240 bash benchmarks/gpu_session.sh
#
# STEPS_LEFT (default profile,packing,check) names the parts to run; GRIDS passes to gpu_profile_7b.sh (default
# here: sanity,targets,trace,compiled-lora-chat,baseline,family-lora,family-qlora — the rest of the table
# comes last, if at all). Each part gets what is left of BUDGET_S (default 520 s) less a reserve for the
# parts after it; a part not started in time is written down as not run. On a machine without a GPU:
# WHEELS=none PRESET=tiny LENGTHS=384 STEPS=1 FAMILY_PRESETS=tiny-qwen2.5-vl BENCH_PRESET=tiny BENCH_N=16 tries
# it with this machine's packages.
set -u
OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d /tmp/qwenvl-gpu-session.XXXXXX)
LOG=$OUT/session.log
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STEPS_LEFT=${STEPS_LEFT:-profile,packing,check}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-520} ))
: >>"$LOG"
say() { echo "=== $* $(date +%T)" | tee -a "$LOG"; }
left() { echo $(( DEADLINE - $(date +%s) )); }

WHEELS=${WHEELS:-.whl}  # WHEELS=none: install nothing (a dry run on this machine's own environment)
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  say "installing $(ls "$WHEELS"/*.whl | wc -l) wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    >>"$LOG" 2>&1 || { say "wheel install failed (see session.log)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY benchmarks/versions.py --require-cli >"$OUT/versions.txt" 2>&1
rc=$?
cat "$OUT/versions.txt" >>"$LOG"
[ $rc = 0 ] || { say "qwenvl does not import here (versions.txt)"; exit 1; }

part() {  # part NAME RESERVE_S: whether to run NAME now, leaving RESERVE_S for the parts after it
  local name=$1 reserve=$2
  case ",$STEPS_LEFT," in *",$name,"*) ;; *) return 1 ;; esac
  budget=$(( $(left) - reserve ))
  if [ "$budget" -lt 60 ]; then
    say "$name not run: $(left) s left"
    return 1
  fi
  say "$name (at most $budget s)"
}

if part profile 200; then
  OUT=$WORK/profile BUDGET_S=$budget \
    GRIDS=${GRIDS:-sanity,targets,trace,compiled-lora-chat,baseline,family-lora,family-qlora} \
    bash benchmarks/gpu_profile_7b.sh ${VOCAB:-} >>"$LOG" 2>&1
  say "profile exit $?"
fi
if part packing 100; then  # mixed lengths at the 7B size: packing beside dynamic padding and the upstream recipe
  timeout "$budget" $PY benchmarks/train_bench.py --preset "${BENCH_PRESET:-qwen-vl-7b}" --n "${BENCH_N:-32}" \
    --rounds 1 --threads 8 --configs "${BENCH_CONFIGS:-upstream,dynamic,packing}" \
    --output "$WORK/train-bench.json" >>"$LOG" 2>&1
  say "packing exit $?"
fi
if part check 0; then
  OUT=$WORK/check BUDGET_S=$(( budget - 30 )) bash benchmarks/gpu_train_check.sh >>"$LOG" 2>&1
  say "check exit $?"
fi

{
  cat "$OUT/versions.txt"
  grep "^===" "$LOG"
  for json in "$WORK"/profile/profile-*.json; do
    [ -f "$json" ] || continue
    $PY - "$json" <<'EOF'
import sys
from qwenvl_cli.profile import ProfileResult
result = ProfileResult.model_validate_json(open(sys.argv[1], encoding="utf-8").read())
for cell in result.cells + result.baseline_cells:
    speed = f"{cell.memory_gib:.1f} GiB, {cell.seconds_per_step:.2f} s/it, MFU {cell.mfu}" if cell.status == "ok" else cell.reason
    print(f"{sys.argv[1].rsplit('/', 1)[-1]}: {cell.method} {cell.length} {cell.recipe}: {cell.status}: {speed}")
    if cell.trace is not None:
        print("  trace:", cell.trace.line())
        for site in cell.trace.sync_sites[:8]:
            print(f"  host sync: {site.calls} × {site.operator} ← {site.where}")
for ratio in result.ratios:
    print(f"  vs upstream: s/it ×{ratio.seconds_per_step_vs_upstream}, memory ×{ratio.memory_vs_upstream}")
EOF
  done
  [ -f "$WORK/train-bench.json" ] && grep -A3 -E '"(upstream|dynamic|packing)": \{' "$WORK/train-bench.json" | head -40
  [ -f "$WORK/check/gpu_train_check.json" ] && grep -E '"(step|status)"' "$WORK/check/gpu_train_check.json" | paste - -
} >"$OUT/summary.txt" 2>&1
tar czf "$OUT/session.tgz" -C "$WORK" . 2>>"$LOG"
ls -la "$OUT" >>"$LOG"
cat "$OUT/summary.txt"
rm -rf "$WORK"
