#!/usr/bin/env bash
# One prepared run on a single NVIDIA GPU machine (a lent H200, an x86 GPU box or a Jetson), < 8 minutes.
# Writes everything into $OUT (default ./gpu_results): logs, JSON and Markdown tables.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   DEVICE=cpu SMALL=1 bash benchmarks/gpu_check.sh   # dry run of the same code on a CPU (tests/test_gpu_check.py)
#
# Steps (each is skipped, with the reason written to the log, when its dependency is missing):
#   1. environment: nvidia-smi, torch/CUDA, triton, onnxruntime providers, tensorrt
#   2. kernels: Triton band-stop kernel vs the numpy reference (tests/test_kernels.py on CUDA) and batched
#      band-stop throughput of 64 frames: torch.fft vs Triton vs a numpy loop
#   3. pretraining throughput of the tiny/small/base presets on the GPU, fp32 vs bf16 autocast
#   4. export the bundled demo checkpoint to ONNX + TensorRT-ready ONNX; build a TensorRT engine when the
#      tensorrt module is importable; `usfm-edge bench` with PyTorch CUDA fp32/bf16, ONNX Runtime
#      CUDA/TensorRT providers and the engine, side by side
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
export DEVICE="${DEVICE:-cuda}" SMALL="${SMALL:-0}" OUT
log() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu_check.log"; }
step() { local name="$1" limit="$2"; shift 2; log "start $name (limit ${limit}s)";
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?; log "end $name rc=$rc"; tail -n 25 "$OUT/$name.log"; }

step env 60 bash -c "nvidia-smi; $PY - <<'PY'
import importlib, json
out = {}
for m in ('torch', 'triton', 'onnxruntime', 'tensorrt', 'openvino'):
    try:
        mod = importlib.import_module(m); out[m] = getattr(mod, '__version__', '?')
    except Exception as e:
        out[m] = f'missing ({type(e).__name__})'
import torch
out['cuda'] = torch.cuda.is_available() and torch.cuda.get_device_name(0)
try:
    import onnxruntime as ort; out['ort_providers'] = ort.get_available_providers()
except Exception:
    pass
from usfm_edge.bench.sysinfo import machine_info
out['machine'] = machine_info()  # the host CPU model and ISA, as detected
print(json.dumps(out, indent=1))
PY"

step kernels_test 120 "$PY" -m pytest -q tests/test_kernels.py -x -p no:cacheprovider

step kernels_bench 120 "$PY" - <<'PY'
import json, os, time, numpy as np, torch
from usfm_edge.kernels.rings import BandStopMaskGenerator
from usfm_edge.kernels.reference import band_stop_filter_np
from usfm_edge.kernels.torch_fft import band_stop_filter
dev, n = os.environ["DEVICE"], 8 if os.environ["SMALL"] == "1" else 64
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
gen = BandStopMaskGenerator(224)
rng = np.random.default_rng(0)
x = torch.rand(n, 1, 224, 224, device=dev)
m = torch.from_numpy(np.stack([gen(rng) for _ in range(n)]))[:, None].to(dev)
xn, mn = x.cpu().numpy(), m.cpu().numpy()
res = {"device": dev, "frames": n}
def t(fn, reps=30):
    for _ in range(3): fn()
    sync(); s = time.perf_counter()
    for _ in range(reps): fn()
    sync(); return (time.perf_counter() - s) / reps * 1000
res["numpy_loop_ms"] = t(lambda: [band_stop_filter_np(xn[i, 0], mn[i, 0]) for i in range(n)], 3)
for impl in ("fft", "triton", "matmul"):
    try:
        res[f"torch_{impl}_ms"] = t(lambda: band_stop_filter(x, m, impl=impl))
        ref = band_stop_filter_np(xn[0, 0].astype(np.float64), mn[0, 0])
        res[f"torch_{impl}_max_err"] = float(np.abs(band_stop_filter(x, m, impl=impl)[0, 0].cpu().numpy() - ref).max())
    except Exception as e:
        res[f"torch_{impl}"] = f"failed: {e}"
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ["OUT"], "kernels_gpu.json"), "w"), indent=1)
PY

step pretrain_gpu 180 "$PY" - <<'PY'
import json, os, time, torch
from usfm_edge.models.mim import build_mim, MimConfig
res = []
dev, small = os.environ["DEVICE"], os.environ["SMALL"] == "1"
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
runs = (("usfm_vit_tiny_patch16_224", 2),) if small else (
    ("usfm_vit_tiny_patch16_224", 256), ("usfm_vit_small_patch16_224", 256), ("usfm_vit_base_patch16_224", 128))
for preset, batch in runs:
    for amp in (None, torch.bfloat16):
        model = build_mim(preset, 224, MimConfig(), 0.1).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        img = torch.randn(batch, 3, 224, 224, device=dev)
        smask = (torch.rand(batch, 196, device=dev) < 0.6).to(torch.uint8)
        fmask = torch.ones(batch, 224, 224, device=dev)
        def step():
            with torch.autocast(dev, dtype=amp or torch.float32, enabled=amp is not None):
                loss, _, _ = model(img, smask, fmask)
            loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        reps = 2 if small else 10
        for _ in range(1 if small else 3): step()
        sync(); s = time.perf_counter()
        for _ in range(reps): step()
        sync(); dt = (time.perf_counter() - s) / reps
        res.append({"preset": preset, "amp": "bf16" if amp else "fp32", "batch": batch, "images_per_s": batch / dt})
        print(res[-1], flush=True)
        del model, opt
        if dev == "cuda": torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ["OUT"], "pretrain_gpu.json"), "w"), indent=1)
PY

CKPT=usfm_edge/assets/checkpoints/busbra_seg_tiny.safetensors
step export 180 bash -c "$PY -m usfm_edge.cli export $CKPT --target onnx -o $OUT/b/seg-onnx-fp32.usfm && \
  $PY -m usfm_edge.cli export $CKPT --target tensorrt --precision fp16 -o $OUT/b/seg-trt-fp16.usfm"
# one timing process per variant (--rounds 1): each process initialises CUDA and its providers once
if [ "$SMALL" = 1 ]; then BENCH_ARGS="--batch 1 --runs 3 --eval-frames 2"; else BENCH_ARGS="--batch 1,16 --runs 50"; fi
step bench 210 "$PY" -m usfm_edge.cli bench "$OUT"/b/*.usfm --torch "$CKPT" --torch-bf16 --device "$DEVICE" $BENCH_ARGS --rounds 1 \
  --json "$OUT/bench_gpu.json" --md "$OUT/bench_gpu.md"
rm -rf "$OUT/b"
log "done; results in $OUT"
