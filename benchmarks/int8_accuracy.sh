#!/usr/bin/env bash
# fp32 vs INT8 accuracy of the demo models on the held-out patients of the full datasets (same split as training).
#   bash benchmarks/int8_accuracy.sh [DATA_ROOT=../shared/data] [OUT=runs/int8_accuracy]
#   (DATASETS="hc18" for one dataset, TARGETS="openvino jetson" for some INT8 paths, LIMIT=N for at most N
#   held-out frames; existing bundles are reused)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"; OUT="${2:-runs/int8_accuracy}"
LIMIT_ARGS=(); [ -n "${LIMIT:-}" ] && LIMIT_ARGS=(--limit "$LIMIT")   # default: every held-out frame
# static frame size of the Jetson bundles (a scanner's size; the runtime fits other frames to it)
declare -A FRAME=([busbra]=416x512 [hc18]=540x800)
mkdir -p "$OUT"
for ds in ${DATASETS:-busbra hc18}; do
  ck="usfm_edge/assets/checkpoints/${ds}_seg_tiny.safetensors"
  [ -d "$OUT/$ds-openvino-fp32.usfm" ] || usfm-edge export "$ck" --target openvino -o "$OUT/$ds-openvino-fp32.usfm"
  for t in ${TARGETS:-openvino onnx jetson}; do
    fs=(); [ "$t" = jetson ] && fs=(--frame-size "${FRAME[$ds]}")
    [ -d "$OUT/$ds-$t-int8.usfm" ] || usfm-edge export "$ck" --target $t -p int8 --calib "$ds:$DATA/$ds" "${fs[@]}" \
        -o "$OUT/$ds-$t-int8.usfm"
  done
  for b in "$ck" "$OUT/$ds"-openvino-fp32.usfm $(for t in ${TARGETS:-openvino onnx jetson}; do echo "$OUT/$ds-$t-int8.usfm"; done); do
    name=$(basename "$b"); name="${name%.usfm}"; name="${name%.safetensors}"
    usfm-edge evaluate "$b" --data "$ds:$DATA/$ds" --split val "${LIMIT_ARGS[@]}" --json "$OUT/eval-$ds-$name.json" > /dev/null
    echo "evaluated $name on $ds"
  done
done
python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| model | variant | backend | precision | Dice | HD95 px | HC MAE mm (<150 / 150-250 / >250) | n |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(out.glob("eval-*.json")):
    r = json.loads(f.read_text()); m = r["metrics"]
    bins = " / ".join(f"{m[k]:.2f}" for k in ("hc_mae_mm_lt150", "hc_mae_mm_150_250", "hc_mae_mm_gt250") if k in m)
    hc = f"{m['hc_mae_mm']:.2f} ({bins})" if "hc_mae_mm" in m else "-"
    print(f"| {f.stem.split('-')[1]} | {f.stem.split('-', 2)[2]} | {r['backend']} | {r['precision']} | {m['dice']:.4f} | {m['hd95']:.1f} | {hc} | {m['n']} |")
PY
