#!/usr/bin/env bash
# kdwrap's GPU speed figures in one device call, the most valuable first, every row kept as it is measured:
#
#   bash benchmarks/gpu_speed_suite.sh [--deadline SECONDS] [STEP ...]   # default: every step, in the order below
#   DEADLINE=240 bash benchmarks/gpu_speed_suite.sh                      # the same as --deadline 240
#   DEVICE=cpu PYTHON=.venv/bin/python bash benchmarks/gpu_speed_suite.sh   # dry run on a CPU: tiny sizes
#
# One overall deadline (default 540 s, inside a device call's 600 s): each step is one speed.py or knn_speed.py
# process given what is left of it (--deadline), so it stops building and timing in time to write its table and
# plot, with `timeout` behind it; a step that no longer fits is listed as not run. Each script rewrites its JSON after
# every row, and a packer refreshes $OUT/speed.tgz every few seconds, so a call cut at any moment returns what was
# measured. Needs only what the GPU machine has (python3, torch, timm, matplotlib) and this checkout (imported
# through PYTHONPATH). $OUT (default benchmarks/results/device/) receives 3 files (a device call returns at most 8):
#   speed.tgz    speed_<step>.json / .png / .log, speed_profile_profile.txt, knn_speed_knn.json / .png,
#                targets.json, summary.txt (what each step measured, or why not), suite.log (this output)
#   gpu.txt      the GPU, driver, torch and timm versions
#   targets.txt  benchmarks/speed_targets.py's verdicts (also printed at the end)
# Unpack here with `tar xzf speed.tgz -C benchmarks/results/`; `python benchmarks/speed.py --report FILE` prints a
# step's table (knn_speed.py --report likewise).
#
# The steps, most valuable first (targets in benchmarks/speed_targets.py); H200 times from 2026-12-04:
#   core        ONE m=3 (auto, sequential, fused) and OSAKD (in-batch, bank 16,384) against plain on CIFAR
#               ResNet-32 and timm resnet50, batch 128 (~30 s)
#   cudagraphs  plain and ONE m=3 fused under torch.compile(mode="reduce-overhead"), ResNet-32 (~80 s: compiling)
#   family      KD, DML, OKDDip, BYOT and PCL m=3 (auto, sequential, fused) against plain, both models (~20 s
#               without PCL, which is not yet timed on a GPU)
#   branches    ONE m=2 and m=4 in each execution, both models (~30 s)
#   models      ONE m=3 (auto, sequential, fused) on the other 224-px models (~80 s)
#   profile     kernel profile of plain and ONE m=3 auto, both models (slow to start on a GPU: last but one)
#   knn         k-NN search over the ImageNet-sized bank, 1,281,167 x 1000 (~20 s)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/device}
DEVICE=${DEVICE:-cuda}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-540}
if [ "${1:-}" = "--deadline" ]; then DEADLINE=$2; shift 2; fi
ALL_STEPS=(core cudagraphs family branches models profile knn)
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=("${ALL_STEPS[@]}")
for step in "${steps[@]}"; do
  [[ " ${ALL_STEPS[*]} " == *" $step "* ]] || { echo "unknown step '$step'; valid: ${ALL_STEPS[*]}" >&2; exit 2; }
done

# Sizes per device: the GPU's are the figures; the CPU's only run the plumbing in seconds.
# One thread on a CPU: a dry run shares its machine (CI, other jobs), where waiting threads only spin.
if [ "$DEVICE" = cpu ]; then
  R32=cifar_resnet32:2:16; R50=resnet10t:2:32; OTHERS=(resnet10t:2:32)
  TIMING=(--repeats 2 --warmup 1 --threads 1); KNN=(--repeats 2 --threads 1)
  COMPILE=(--compile --compile-backend eager); BANK=4096:10:16
else
  R32=cifar_resnet32; R50=resnet50; OTHERS=(resnet18 efficientnet_b0 mobilenetv3_large_100 regnety_016)
  TIMING=(); KNN=(); COMPILE=(--compile --compile-mode reduce-overhead); BANK=1281167:1000:256
fi
TAIL_S=10     # kept after the last step: the verdicts and the last pack
MIN_STEP_S=20  # a step given less than this would only start up: it is listed as not run

start=$SECONDS
work=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$work/suite.log") 2>&1
pack() {  # the archive is replaced whole (renamed), so a call cut while packing still returns the previous one
  local part="$OUT/.speed.$BASHPID.part"  # one per packer: the loop and a step's end may pack at once
  tar czf "$part" --warning=no-file-changed -C "$work" . 2>/dev/null
  [ $? -le 1 ] && mv -f "$part" "$OUT/speed.tgz"
}
(while sleep 5; do pack; done) &
packer=$!
trap 'kill $packer 2>/dev/null' EXIT

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 || true
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } > "$OUT/gpu.txt"
echo "device $DEVICE, deadline ${DEADLINE} s, steps: ${steps[*]}"

failed=0
summary=()
run() {  # STEP SCRIPT ARGS...: one benchmark process with what is left of the deadline
  local step=$1 script=$2; shift 2
  local left=$((DEADLINE - (SECONDS - start) - TAIL_S))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    summary+=("$step: not run: deadline (${left} s left)"); echo "== $step: not run, ${left} s left"; return
  fi
  local json="$work/${script%.py}_$step.json"
  echo "== $step (deadline ${left} s): $script $*"
  local t0=$SECONDS
  timeout -k 5 $((left + 5)) "$PY" "benchmarks/$script" --device "$DEVICE" --deadline "$left" --out "$json" "$@" \
    > "$work/${script%.py}_$step.log" 2>&1
  local rc=$?
  local state="done"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then state="killed at its limit (rows so far kept)"; failed=1
  elif [ "$rc" -ne 0 ]; then state="exit $rc"; failed=1; tail -n 5 "$work/${script%.py}_$step.log"; fi
  local counts
  counts=$("$PY" -c "import json, sys; d = json.load(open(sys.argv[1]))
print(len(d['results']), 'rows measured,', len(d.get('not_measured', [])), 'not')" "$json" 2>/dev/null) \
    || counts="no JSON"
  summary+=("$step: $state after $((SECONDS - t0)) s; $counts")
  sed -n '/^| /p' "$work/${script%.py}_$step.log"
  pack
}

for step in "${steps[@]}"; do
  case $step in
    core) run core speed.py --models "$R32" "$R50" --variants '^(ONE m=3 |OSAKD (in-batch|bank 16,384)$)' \
      "${TIMING[@]}" ;;
    cudagraphs) run cudagraphs speed.py --models "$R32" "${COMPILE[@]}" --variants '^ONE m=3 fused$' "${TIMING[@]}" ;;
    family) run family speed.py --models "$R32" "$R50" --variants '^(KD|DML|OKDDip|BYOT|PCL m=3 )' "${TIMING[@]}" ;;
    branches) run branches speed.py --models "$R32" "$R50" --variants '^ONE m=(2|4) ' "${TIMING[@]}" ;;
    models) run models speed.py --models "${OTHERS[@]}" --variants '^ONE m=3 ' --repeats 15 --warmup 3 \
      "${TIMING[@]}" ;;
    profile) run profile speed.py --models "$R32" "$R50" --variants '^ONE m=3 auto$' --profile --repeats 5 \
      "${TIMING[@]}" ;;
    knn) run knn knn_speed.py --banks "$BANK" "${KNN[@]}" ;;
  esac
done

printf '%s\n' "${summary[@]}" > "$work/summary.txt"
echo "== summary ($((SECONDS - start)) s of ${DEADLINE})"
cat "$work/summary.txt"
# The verdicts (a missed target is a result, not a failed call), from every step but the profile's few steps.
timed=()
for f in "$work"/speed_*.json; do [ -e "$f" ] && [ "$f" != "$work/speed_profile.json" ] && timed+=("$f"); done
if [ ${#timed[@]} -gt 0 ]; then
  echo "== speed targets"
  "$PY" benchmarks/speed_targets.py "${timed[@]}" --out "$work/targets.json" > "$OUT/targets.txt" 2>&1
  cat "$OUT/targets.txt"
fi
kill $packer 2>/dev/null
wait $packer 2>/dev/null
pack
rm -f "$OUT"/.speed.*.part
exit $failed
