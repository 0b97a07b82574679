#!/usr/bin/env bash
# The README's "Your own data in 15 minutes", run exactly as written and timed step by step.
#   bash benchmarks/own_data.sh [OUT=runs/own_data]
# IMAGES / MASKS / PATIENT / TEST_IMAGES / TEST_MASKS / MINUTES override the bundled-sample defaults, e.g.
#   IMAGES=my_scans/images MASKS=my_scans/masks PATIENT='^(\d+)_' bash benchmarks/own_data.sh
# Prints one line per step (seconds) and a Markdown table at the end; the machine is named as detected.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/own_data}"
IMAGES="${IMAGES:-usfm_edge/assets/sample/busbra/Images}"
MASKS="${MASKS:-usfm_edge/assets/sample/busbra/Masks}"
PATIENT="${PATIENT:-bus_(\d+)}"
MINUTES="${MINUTES:-5}"
INIT="${INIT:-usfm_edge/assets/checkpoints/busbra_seg_tiny.safetensors}"
DATA="pairs:$IMAGES,$MASKS?patient=$PATIENT"
# a small folder is calibrated anyway (the README says why); with your own data give 300+ frames and drop this
export USFM_EDGE_MIN_CALIB_FRAMES="${USFM_EDGE_MIN_CALIB_FRAMES:-8}"
rm -rf "$OUT"; mkdir -p "$OUT"
declare -a STEPS=() SECONDS_TAKEN=()
step() {  # step NAME COMMAND...: run, time, keep the log
  local name="$1"; shift
  local t0; t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "step $name failed:"; tail -20 "$OUT/$name.log"; exit 1; }
  local dt; dt=$(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.0f}')" "$t0" "$(date +%s.%N)")
  STEPS+=("$name"); SECONDS_TAKEN+=("$dt"); echo "$name: ${dt} s"
}
step finetune usfm-edge finetune --task seg --head hybrid --init "$INIT" --data "$DATA" --img-size 256 \
    --time-limit-min "$MINUTES" --eval-every 10 --out "$OUT/my_seg"
step export usfm-edge export "$OUT/my_seg/best.safetensors" --target openvino -o "$OUT/my_seg-openvino-fp32.usfm"
step quantize usfm-edge quantize "$OUT/my_seg-openvino-fp32.usfm" --calib "$DATA" -o "$OUT/my_seg-openvino-int8.usfm"
step predict usfm-edge predict "$OUT/my_seg-openvino-int8.usfm" "$IMAGES" --out "$OUT/predictions"
if [ -n "${TEST_IMAGES:-}" ]; then
  step evaluate usfm-edge evaluate "$OUT/my_seg-openvino-int8.usfm" --data "pairs:$TEST_IMAGES,$TEST_MASKS" \
      --split all --json "$OUT/eval.json"
else
  step evaluate usfm-edge evaluate "$OUT/my_seg-openvino-int8.usfm" --data "$DATA" --split val --json "$OUT/eval.json"
fi
python - "$OUT" "${STEPS[*]}" "${SECONDS_TAKEN[*]}" <<'PY'
import json, sys, pathlib
from usfm_edge.bench.sysinfo import machine_info
out, steps, secs = pathlib.Path(sys.argv[1]), sys.argv[2].split(), [int(s) for s in sys.argv[3].split()]
m = machine_info()
print(f"\nMachine: {m['cpu']} ({m['cores']} cores, {', '.join(m['isa'])})")
print("| step | seconds |\n|---|---|")
for s, t in zip(steps, secs):
    print(f"| {s} | {t} |")
print(f"| total | {sum(secs)} |")
ev = json.loads((out / "eval.json").read_text())
metrics = ev.get("metrics", ev)
print(f"\nheld-out Dice of the INT8 bundle: {metrics.get('dice'):.4f} on {metrics.get('n')} frames")
PY
