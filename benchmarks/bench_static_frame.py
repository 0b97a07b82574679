"""An any-size bundle against the same model exported with a static frame (``--frame-size``), on one frame.

Both bundles run the frame through ``Engine.run_raw`` in the same process, alternating in rounds (median of the
round medians); then each graph's OpenVINO counters (PERF_COUNT, batch-1 compile as the runtime does) are summed
by stage: ``/pre/*`` (in-graph resize + normalisation), ``/model/*`` and the rest (nodes OpenVINO renamed when
it fused them, all inside the model, e.g. LayerNorm ``MVN_*`` and per-block ``Multiply_*`` subgraphs).
``--backend onnxruntime`` times two ORT bundles the same way (no counters).

Usage (the frame must have the static bundle's size)::

    usfm-edge export CKPT --target openvino -p int8 --calib busbra:PATH -o any.usfm
    usfm-edge export CKPT --target openvino -p int8 --calib busbra:PATH --frame-size 352x276 -o static.usfm
    python benchmarks/bench_static_frame.py any.usfm static.usfm --frame FRAME.png [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import sys

import numpy as np


def _timings(bundles: dict, x: np.ndarray, threads: int, rounds: int, runs: int, backend: str) -> dict:
    from usfm_edge.bench.peer import time_batches
    from usfm_edge.runtime import Engine

    engines = {k: Engine.open(v, backend=backend, threads=threads) for k, v in bundles.items()}
    res = collections.defaultdict(list)
    try:
        for _ in range(rounds):
            for k, e in engines.items():
                res[k].append(float(np.median(time_batches(e.run_raw, x, [1], warmup=3, runs=runs)["1"])))
    finally:
        for e in engines.values():
            e.close()
    return {k: float(np.median(v)) for k, v in res.items()}


def _stages(bundle: str, x: np.ndarray, threads: int, n: int = 20) -> dict:
    import openvino as ov

    core = ov.Core()
    model = core.read_model(f"{bundle}/model.xml")
    ps = model.inputs[0].get_partial_shape()
    ps[0] = 1
    model.reshape({model.inputs[0]: ps})
    req = core.compile_model(model, "CPU", {"PERF_COUNT": "YES", "INFERENCE_NUM_THREADS": threads,
                                            "PERFORMANCE_HINT": "LATENCY"}).create_infer_request()
    for _ in range(5):
        req.infer({0: x})
    stage: collections.Counter = collections.Counter()
    for _ in range(n):
        req.infer({0: x})
        for p in req.profiling_info:
            if p.status == p.Status.EXECUTED:
                name = p.node_name
                key = "pre" if name.startswith("/pre/") else "model" if name.startswith("/model/") else "fused, in the model"
                stage[key] += p.real_time.total_seconds() * 1e3 / n
    return dict(stage)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("any_size")
    ap.add_argument("static")
    ap.add_argument("--frame", required=True, help="an image (or .npy uint8 array) of the static bundle's size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=["openvino", "onnxruntime"], default="openvino")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=15)
    args = ap.parse_args(argv)
    from usfm_edge.data.readers import read_image

    frame = np.load(args.frame) if args.frame.endswith(".npy") else read_image(args.frame)
    x = np.ascontiguousarray(frame[None])
    bundles = {"any-size": args.any_size, f"static {frame.shape[0]}x{frame.shape[1]}": args.static}
    times = _timings(bundles, x, args.threads, args.rounds, args.runs, args.backend)
    print(f"{args.backend}, frame {frame.shape[0]}x{frame.shape[1]}, {args.threads} threads, median of {args.rounds} "
          f"round medians ({args.runs} runs each; both bundles in this process)\n")
    if args.backend == "onnxruntime":
        print("| bundle | ms, batch 1 |\n|---|---|")
        for k, ms in times.items():
            print(f"| {k} | {ms:.2f} |")
        return 0
    print("| bundle | ms, batch 1 | pre-processing ms (share of the counters) | model ms | fused nodes ms |")
    print("|---|---|---|---|---|")
    for (k, path), ms in zip(bundles.items(), times.values()):
        st = _stages(path, x, args.threads)
        total = sum(st.values())
        print(f"| {k} | {ms:.2f} | {st.get('pre', 0):.2f} ({100 * st.get('pre', 0) / total:.1f}%) | "
              f"{st.get('model', 0):.2f} | {st.get('fused, in the model', 0):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
