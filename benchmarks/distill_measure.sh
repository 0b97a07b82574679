#!/usr/bin/env bash
# Teacher vs distilled student, both datasets: INT8 exports (OpenVINO + ORT), held-out evaluation of the student
# bundles, and the side-by-side latency tables of benchmarks/RESULTS.md section 9.
#   bash benchmarks/distill_measure.sh [DATA_ROOT=../shared/data] [OUT=runs/kd_eval] [STUDENTS=shipped|RUN_BB,RUN_HC]
# STUDENTS defaults to the shipped students (usfm_edge/assets/checkpoints/*_seg_nano.safetensors); pass
# "runs/kd_busbra_nano160_s2/student.safetensors,runs/kd_hc18_nano192_s2/student.safetensors" for fresh distillation runs.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data}"; OUT="${2:-runs/kd_eval}"; STUDENTS="${3:-shipped}"
CK=usfm_edge/assets/checkpoints
declare -A TEACHER=([busbra]=$CK/busbra_seg_tiny.safetensors [hc18]=$CK/hc18_seg_tiny.safetensors)
declare -A STUDENT=([busbra]=$CK/busbra_seg_nano.safetensors [hc18]=$CK/hc18_seg_nano.safetensors)
if [ "$STUDENTS" != shipped ]; then IFS=, read -r STUDENT[busbra] STUDENT[hc18] <<< "$STUDENTS"; fi
mkdir -p "$OUT"
for ds in busbra hc18; do
  for who in teacher student; do
    if [ $who = teacher ]; then ck=${TEACHER[$ds]}; else ck=${STUDENT[$ds]}; fi
    for t in openvino onnx; do
      usfm-edge export "$ck" --target $t -p int8 --calib "$ds:$DATA/$ds" --force -o "$OUT/$ds-$who-$t-int8.usfm" \
          > "$OUT/export-$ds-$who-$t.log" 2>&1
    done
    usfm-edge export "$ck" --target openvino --force -o "$OUT/$ds-$who-openvino-fp32.usfm" > "$OUT/export-$ds-$who-fp32.log" 2>&1
  done
  for b in "$OUT/$ds"-{student,teacher}-{openvino,onnx}-int8.usfm; do
    usfm-edge evaluate "$b" --data "$ds:$DATA/$ds" --json "$b.eval.json" > /dev/null
  done
  usfm-edge bench "$OUT/$ds"-teacher-openvino-int8.usfm "$OUT/$ds"-student-openvino-int8.usfm \
      "$OUT/$ds"-teacher-onnx-int8.usfm "$OUT/$ds"-student-onnx-int8.usfm "$OUT/$ds"-student-openvino-fp32.usfm \
      --torch "${TEACHER[$ds]}" --data "$ds:$DATA/$ds" --eval-frames 0 --runs 40 --threads 2 --batch 1,4 \
      > "$OUT/bench_$ds.md" 2>&1
  echo "$ds done: $OUT/bench_$ds.md"
done
