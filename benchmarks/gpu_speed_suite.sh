#!/usr/bin/env bash
# ONE's GPU speed measurements (branch executions, compile, CUDA graphs) in one device call that stays under its
# 10-minute limit:
#
#   bash benchmarks/gpu_speed_suite.sh [STEP ...]      # STEPs: eager models compile cudagraphs (default: all four)
#
# Needs only what the GPU machine's image has (torch, timm, matplotlib) and this checkout; kdwrap is imported
# through PYTHONPATH. Each step has its own time limit, so a slow one cannot eat the others' time; their sum
# (570 s) leaves the call room inside 600 s. The limits are estimates from the prototypes' timings: a step that
# runs over prints so, and can be run alone in a call of its own (`bash benchmarks/gpu_speed_suite.sh compile`).
# Results go to $OUT (or benchmarks/results/device/), packed after every step into one archive, since a device
# call returns at most 8 files:
#   $OUT/speed.tgz   speed_<step>.json / .png / .log, and speed_eager_profile.txt
#   $OUT/gpu.txt      the GPU, driver, torch and timm versions
#   $OUT/targets.txt  benchmarks/speed_targets.py's verdicts on the targets (also targets.json in the archive)
# Unpack here with `tar xzf speed.tgz -C benchmarks/results/` and quote the tables in docs/results.md.
#
# What each step answers (targets in benchmarks/speed_targets.py):
#   eager       CIFAR ResNet-32 and timm resnet50, batch 128, bf16 + channels_last: plain, ONE m=2/3/4 in each
#               execution (auto, sequential, fused), OSAKD; peak memory; kernel profile of plain and ONE m=3
#   models      auto vs sequential vs fused (m=3) on the fusible models of the ONE list (batch 128, 224 px)
#   compile     torch.compile (default mode) of ResNet-32: plain and ONE m=3 sequential and fused (auto follows
#               its rule inside compiled code: fused for this model)
#   cudagraphs  the same with torch.compile(mode="reduce-overhead") (CUDA graphs)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-benchmarks/results/device}
DEVICE=${DEVICE:-cuda}   # DEVICE=cpu PYTHON=.venv/bin/python: the plumbing on a machine without a GPU (CPU sizes)
PY=${PYTHON:-python3}
failed=0
work=$(mktemp -d)
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(eager models compile cudagraphs)

{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv 2>&1 || true
  "$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"; } > "$OUT/gpu.txt"

speed() {  # NAME LIMIT_S ARGS...: one benchmarks/speed.py run, logged, packed
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): speed.py $*"
  timeout "$limit" "$PY" benchmarks/speed.py --device "$DEVICE" --out "$work/speed_$name.json" "$@" \
    > "$work/speed_$name.log" 2>&1
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    failed=1
    if [ "$rc" -eq 124 ]; then echo "   over its limit"; else echo "   exit $rc:"; tail -n 5 "$work/speed_$name.log"; fi
  fi
  sed -n '/^| model/,/^$/p' "$work/speed_$name.log"
  tar czf "$OUT/speed.tgz" -C "$work" .
}

for step in "${steps[@]}"; do
  case $step in
    # ONE and OSAKD only: the step's 200 s were sized for them (speed.py's KD and DML rows are not timed here).
    eager) speed eager 200 --profile --variants "ONE|OSAKD" ;;
    models) speed models 140 --models resnet18 efficientnet_b0 mobilenetv3_large_100 regnety_016 \
      --variants "ONE m=3" --repeats 15 --warmup 3 ;;
    compile) speed compile 115 --compile --models cifar_resnet32 --variants "ONE m=3 (sequential|fused)" ;;
    cudagraphs) speed cudagraphs 115 --compile --compile-mode reduce-overhead --models cifar_resnet32 \
      --variants "ONE m=3 (sequential|fused)" ;;
    *) echo "unknown step '$step'; valid: eager models compile cudagraphs" >&2; exit 2 ;;
  esac
done
if ls "$work"/speed_*.json >/dev/null 2>&1; then  # the verdicts; a missed target is a result, not a failed call
  echo "== speed targets"
  "$PY" benchmarks/speed_targets.py "$work" --out "$work/targets.json" | tee "$OUT/targets.txt"
  tar czf "$OUT/speed.tgz" -C "$work" .
fi
exit $failed
