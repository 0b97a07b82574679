"""The deployment commands of ``usfm-edge``: ``export``, ``quantize``, ``bench``, ``predict``, ``keygen``, ``sign``
and ``demo``.

Plain click commands that ``usfm_edge.cli`` attaches to its group (``main.add_command``); the group maps errors to
the exit codes documented there. Like every command, each imports what it needs inside its body, so importing this
module never loads torch or a backend.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from usfm_edge.cli_common import CONTEXT, progress

# ------------------------------------------------------------------------------------------ export
_MAX_HC_INCREASE = click.option(
    "--max-hc-increase", type=float, default=None,
    help="INT8 of a fetal-head model gated on HC18-style frames: largest allowed rise of the mean absolute "
         "head-circumference error in mm (default: reported only)")


def _parse_hw(ctx, param, value):
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected HxW such as 540x800, got {value!r}") from None
    return h, w


@click.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--target", "-t", required=True, help="onnx, openvino (intel-cpu, intel-gpu), jetson (jetson-orin), tensorrt")
@click.option("--precision", "-p", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="default: the target's (fp32 for onnx/openvino, fp16 for jetson/tensorrt)")
@click.option("--calib", "calib", multiple=True, help="INT8 calibration source(s): busbra:PATH, folder:PATH, ...")
@click.option("--max-drop", type=float, default=None, help="INT8: largest allowed task-metric drop vs fp32")
@_MAX_HC_INCREASE
@click.option("--img-size", type=int, default=None, help="model input size (backbone-only checkpoints)")
@click.option("--task", type=click.Choice(["seg", "cls", "enhance", "features"]), default=None,
              help="expected task (a backbone-only checkpoint exports as features)")
@click.option("--frame-size", callback=_parse_hw, default=None,
              help="HxW of the scanner's frames: a static frame size (required shape for jetson/tensorrt, default "
                   "the model input size with a warning; onnx/openvino: optional, resizes become MatMuls, the engine "
                   "fits other frames)")
@click.option("--band-stop", is_flag=True, help="add the band-stop frequency filter (DFT as MatMul) to the graph")
@click.option("--bare", is_flag=True, help="export the plain model on normalised (B, 3, S, S) input")
@click.option("--verify-data", default=None, help="data source whose frames the parity gate uses (default: bundled sample)")
@click.option("--dla-core", type=int, default=None, help="TensorRT DLA core (Jetson Orin)")
@click.option("--workspace-gb", type=float, default=4.0, show_default=True, help="TensorRT builder workspace")
@click.option("--force", is_flag=True, help="replace an existing bundle at --out, and keep the bundle even if the "
              "parity/accuracy gate fails (the exit code is then still 3)")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="bundle folder (default: NAME-TARGET-PRECISION.usfm)")
def export(checkpoint, target, precision, calib, max_drop, max_hc_increase, img_size, task, frame_size, band_stop,
           bare, verify_data, dla_core, workspace_gb, force, out):
    """Export a checkpoint to a verified bundle (model files, usfm.json, SHA256SUMS) for one target.

    \b
    The graph takes raw uint8 frames and does resize, normalisation and post-processing inside, so scanner
    software can feed frames straight to ONNX Runtime, OpenVINO or TensorRT.
    \b
    Examples:
      usfm-edge export runs/busbra_seg/best.safetensors --target openvino
      usfm-edge export runs/busbra_seg/best.safetensors --target jetson --frame-size 540x800
      usfm-edge export runs/busbra_seg/best.safetensors --target openvino -p int8 --calib busbra:PATH
    """
    from usfm_edge.core.errors import ConfigError
    from usfm_edge.export import ExportConfig, check_precision, get_target
    from usfm_edge.export import export as run_export

    try:
        prec = check_precision(get_target(target), precision)
    except ConfigError as exc:
        raise click.BadParameter(str(exc), param_hint="--target/--precision") from None
    if (prec == "int8") != bool(calib):
        raise click.BadParameter("--calib is only used with --precision int8" if calib else
                                 "INT8 needs a real ultrasound calibration set: pass --calib SOURCE", param_hint="--calib")
    cfg = ExportConfig(target=target, precision=prec, out=out, task=task, img_size=img_size, band_stop=band_stop,
                       bare=bare, frame_size=frame_size, force=force, dla_core=dla_core, workspace_gb=workspace_gb,
                       verify_frames=verify_data, overwrite=force)
    if prec == "int8":
        from usfm_edge.calibration import make_quantizer
        from usfm_edge.calibration.recipe import get_recipe

        recipe = get_recipe(None).replace(max_hc_increase_mm=max_hc_increase)
        cfg.quantizer = make_quantizer(list(calib), max_drop=max_drop, force=force, recipe=recipe)
    _report_bundle(run_export(checkpoint, cfg))


def _report_bundle(path: Path) -> None:
    """Print what the export decided; exit 3 when a gate failed and ``--force`` kept the bundle anyway."""
    from usfm_edge.export.bundle import bundle_summary, gate_passed

    click.echo(bundle_summary(path))
    if not gate_passed(path):
        click.secho(f"error: {path} failed its parity/accuracy gate and was kept only because of --force",
                    fg="red", err=True)
        sys.exit(3)


# ------------------------------------------------------------------------------------------- bench
@click.command(context_settings=CONTEXT)
@click.argument("bundles", nargs=-1, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--torch", "torch_ckpt", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="task checkpoint run in PyTorch fp32 in the same run (the reference of the ratios)")
@click.option("--data", default=None, help="frames and task metric from this source (default: bundled BUS-BRA sample)")
@click.option("--batch", default="1", show_default=True, help="comma-separated batch sizes, e.g. 1,8")
@click.option("--threads", default=2, show_default=True, help="intra-op threads of every backend")
@click.option("--runs", default=30, show_default=True, help="timed runs per variant and batch size")
@click.option("--eval-frames", default=16, show_default=True, help="held-out frames for the task metric (0 = skip)")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda (ORT CUDA/TensorRT, PyTorch), GPU/NPU (OpenVINO)")
@click.option("--torch-bf16", is_flag=True, help="also time PyTorch in bf16")
@click.option("--no-memory", is_flag=True, help="with --one-process: skip the per-variant peak-RSS probes")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None, metavar="RATE",
              help="also time batch-1 calls paced at this frame rate (a scanner's: the cores idle between frames)")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True,
              help="fresh processes per variant (the runs are split over them; variants in a rotating order)")
@click.option("--one-process", is_flag=True,
              help="time all variants in this process instead (faster; their idle worker threads compete)")
@click.option("--no-spin", is_flag=True,
              help="ONNX Runtime bundles: worker threads do not spin-wait between calls (docs/embedding.md)")
@click.option("--peer", is_flag=True, help="also time the by-hand INT8 paths on the --torch weights (OpenVINO "
              "convert_model + NNCF, ORT quantize_static) and their ratio to the INT8 bundle of the same backend")
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--md", "md_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--plot", "png_out", type=click.Path(dir_okay=False, path_type=Path), default=None)
def bench(bundles, torch_ckpt, data, batch, threads, runs, eval_frames, device, torch_bf16, no_memory, fps, rounds,
          one_process, no_spin, peer, json_out, md_out, png_out):
    """Latency (p50/p90/p99), throughput, memory, size and task metric of bundles vs PyTorch fp32, side by side.

    Each variant is timed in processes of its own (one runtime per process, as in scanner software).

    \b
    Example:
      usfm-edge bench out/seg-onnx-fp32.usfm out/seg-openvino-int8.usfm --torch seg.safetensors --batch 1,8
      usfm-edge bench out/seg-onnx-fp32.usfm --fps 20     # also at a 20 frames/s scanner's pace
      usfm-edge bench out/seg-openvino-int8.usfm out/seg-onnx-int8.usfm --torch seg.safetensors --peer --batch 1,4
    """
    import shlex

    from usfm_edge.bench.latency import run_bench
    from usfm_edge.bench.report import markdown, write_all

    try:
        batches = tuple(int(b) for b in batch.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {batch!r}", param_hint="--batch") from None
    if png_out and eval_frames == 0:
        raise click.BadParameter("the plot shows latency against the task metric: it needs --eval-frames > 0",
                                 param_hint="--plot")
    result = run_bench(list(bundles), torch_ckpt, data, batches, threads, runs, eval_frames=eval_frames,
                       device=device, torch_bf16=torch_bf16, progress=progress, memory=not no_memory,
                       fps=fps, isolate=not one_process, rounds=rounds, spin=not no_spin, peer=peer)
    command = "usfm-edge bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    click.echo(markdown(result, command))
    for p in write_all(result, json_out, md_out, png_out, command):
        click.echo(f"wrote {p}")


# ---------------------------------------------------------------------------------------------- predict
@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="output folder: overlays/, results.json, results.csv")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "openvino", "tensorrt"]), default="auto",
              show_default=True, help="backend (auto: TensorRT engine > OpenVINO > ONNX Runtime)")
@click.option("--device", default="auto", show_default=True, help="cpu, gpu, cuda:N, npu...")
@click.option("--pixel-spacing", "pixel_spacing", type=click.FloatRange(min=0, min_open=True), default=None,
              metavar="MM", help="mm per pixel for files without their own spacing (a DICOM's own wins)")
@click.option("--threads", type=int, default=None, help="backend CPU threads")
@click.option("--no-overlays", is_flag=True, help="write results.json/.csv only")
@click.option("--anonymize-names", is_flag=True,
              help="name outputs frame_0001.png / file_0001, never after the inputs (names can carry patient data)")
@click.option("--name-map", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="with --anonymize-names: JSON file outside --out mapping file_0001... to the inputs")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM, repeatable): refuse a bundle not signed by one of them")
def predict(bundle, inputs, out, backend, device, pixel_spacing, threads, no_overlays, anonymize_names, name_map,
            trusted_keys):
    """Run BUNDLE on INPUTS (PNG/JPEG/DICOM files, folders, multi-frame DICOM cine); write overlays and tables.

    Areas are in px and, when the pixel spacing is known, mm²; HC18-style bundles also give the head
    circumference in mm. Exit code 1 if any input failed (the others are still written).
    """
    from usfm_edge.runtime.predict_cli import run_predict

    summary = run_predict(bundle, inputs, out, backend=backend, device=device, pixel_spacing=pixel_spacing,
                          threads=threads, overlays=not no_overlays, anonymize_names=anonymize_names,
                          name_map=name_map, trusted_keys=trusted_keys or None)
    click.echo(f"{summary['frames']} frame(s) from {summary['files']} file(s) via {summary['backend']}, "
               f"mean {summary['mean_timing_ms']} ms/frame -> {out}")


# ------------------------------------------------------------------------------------------ keygen / sign
@click.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for signing.key (private, mode 0600) and signing.pub")
@click.option("--force", is_flag=True, help="replace an existing key pair")
def keygen(out, force):
    """Make an Ed25519 key pair for signing bundles (needs usfm-edge[sign])."""
    from usfm_edge.runtime.signing import generate_keypair, key_id, load_public_keys

    priv, pub = generate_keypair(out, force=force)
    click.echo(f"wrote {priv} (keep it secret) and {pub} (key id {key_id(load_public_keys([pub])[0])})")


@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="signing.key from usfm-edge keygen")
def sign(bundle, key):
    """Verify BUNDLE and write its SIGNATURE (Ed25519 over the bytes of SHA256SUMS)."""
    from usfm_edge.runtime.signing import sign_bundle

    click.echo(f"wrote {sign_bundle(bundle, key)}")


# -------------------------------------------------------------------------------------------- demo
@click.command(context_settings=CONTEXT)
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--runs", default=20, show_default=True, help="timed runs per variant in the benchmark")
@click.option("--no-int8", is_flag=True, help="skip the INT8 exports")
def demo(out, runs, no_int8):
    """The whole pipeline on the bundled real sample: export, INT8 behind the accuracy gate, predict, bench."""
    from usfm_edge.bench.demo import run_demo

    run_demo(out, runs=runs, int8=not no_int8)


# ---------------------------------------------------------------------------------------------- quantize
@click.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--calib", "calib", multiple=True, required=True,
              help="calibration source(s) of real frames: busbra:PATH, hc18:PATH, folder:PATH@organ (repeatable)")
@click.option("--max-drop", type=float, default=None,
              help="largest allowed task-metric drop vs fp32 on held-out frames (default: Dice/AUC 0.01, PSNR 0.5 dB)")
@_MAX_HC_INCREASE
@click.option("--val", "val", multiple=True, help="held-out source(s) for the accuracy gate "
              "(default: 20% of the calibration sources' patients, kept out of calibration)")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the bundle's source checkpoint (default: looked up by name + SHA-256 next to the bundle)")
@click.option("-n", "--frames", "n", default=300, show_default=True, help="calibration frames")
@click.option("--seed", default=0, show_default=True, help="sampling and split seed")
@click.option("--recipe", type=click.Choice(["transformer", "transformer-accurate", "transformer-no-smoothquant",
                                              "transformer-matmul", "transformer-ort-convs"]),
              default="transformer",
              show_default=True, help="quantisation recipe (usfm_edge.calibration.recipe)")
@click.option("--manifest", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the calibration manifest (file list + SHA-256) here")
@click.option("--force", is_flag=True, help="replace an existing bundle at --out, and keep the INT8 bundle even if "
              "the accuracy gate fails (the exit code is then still 3)")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="INT8 bundle folder (default: NAME-int8.usfm next to BUNDLE)")
def quantize(bundle, calib, max_drop, max_hc_increase, val, checkpoint, n, seed, recipe, manifest, force, out):
    """Make the INT8 bundle of an exported fp32 bundle, gated on held-out real frames.

    \b
    With the source checkpoint (found next to the bundle or given) the bundle is re-exported through the
    export path (parity against PyTorch); without it the bundle's own fp32 ONNX/IR is quantised.
    \b
    Example:
      usfm-edge quantize seg-openvino-fp32.usfm --calib busbra:PATH --calib hc18:PATH --max-drop 0.01
    """
    from usfm_edge.calibration import quantize_bundle
    from usfm_edge.calibration.recipe import get_recipe

    path = quantize_bundle(bundle, list(calib), out=out, max_drop=max_drop, force=force, checkpoint=checkpoint,
                           recipe=get_recipe(recipe).replace(max_hc_increase_mm=max_hc_increase), n=n, seed=seed,
                           val_specs=list(val) or None, manifest_out=manifest, overwrite=force)
    _report_bundle(path)
