"""usfm-edge command line: thin click commands over the Python API.

Every command imports what it needs inside its body, so ``usfm-edge --help`` is instant and never loads
torch. Exit codes (one place, used by every command):

====  ==============================================================
0     success
1     a domain error (bad input file, corrupt checkpoint, failed export...)
2     usage error (unknown option value, bad config key)
3     a parity or accuracy gate failed (ValidationError; also after ``export``/``quantize --force`` kept the
      bundle of a failed gate)
4     a backend is not installed (BackendUnavailableError; the message names the extra)
====  ==============================================================
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from usfm_edge.train.options import distill_options, finetune_options, overrides_from, pretrain_options

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=110)


class _Group(click.Group):
    """Every command's ``UsfmEdgeError`` becomes a one-line message on stderr (plus a gate's numbers) and its
    documented exit code."""

    def invoke(self, ctx):
        from usfm_edge.core.errors import UsfmEdgeError

        try:
            return super().invoke(ctx)
        except UsfmEdgeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            if getattr(exc, "results", None):
                import json

                click.echo(json.dumps(exc.results, indent=2, default=str), err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(package_name="usfm-edge", prog_name="usfm-edge")
def main():
    """usfm-edge: the USFM ultrasound foundation model, from pretraining to a quantised edge engine."""


# --------------------------------------------------------------------------------------------- info
@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def info(as_json):
    """Versions of usfm-edge and its backends, the devices each backend sees, and the weight families it loads."""
    import json

    from usfm_edge.bench.sysinfo import environment, environment_text
    from usfm_edge.models.registry import WEIGHTS

    env = environment()
    if as_json:
        click.echo(json.dumps({**env, "weights": list(WEIGHTS)}, indent=2))
        return
    click.echo(environment_text(env))
    click.echo("weight families (check each licence before you ship a model built on them):")
    for w in WEIGHTS:
        click.echo(f"  {w['name']:<11} family {w['family']:<5} preset {w['preset']:<25} {w['file']}")
        click.echo(f"  {'':<11} licence: {w['licence']}  ({w['source']})")


# --------------------------------------------------------------------------------- convert-weights
@main.command("convert-weights", context_settings=CONTEXT)
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="destination .safetensors")
@click.option("--model", default=None,
              help="preset name (default: the family detected from the keys, the preset from the embedding width)")
@click.option("--half", is_flag=True, help="store fp16 weights")
def convert_weights(src, dst, model, half):
    """Convert a USFM, TinyUSFM, UltraFedFM (MAE/timm ViT), SimMIM or usfm-edge checkpoint to a usfm-edge
    .safetensors (strictly verified); prints the family and preset it detected.

    \b
    Examples:
      usfm-edge convert-weights USFM_latest.pth -o usfm_base.safetensors
      usfm-edge convert-weights TinyUSFM.pth -o tinyusfm.safetensors
      usfm-edge convert-weights ultrafedfm_checkpoint.pth -o ultrafedfm.safetensors
    """
    from usfm_edge.models.registry import convert_weights as convert

    report = convert(src, dst, model_name=model, half=half)
    click.echo(f"detected family '{report.family}', preset '{report.preset}' ({report.source_format})")
    click.echo(report.summary())
    renamed = sorted(set(report.renamed.items()))
    if renamed:
        shown = ", ".join(f"{a} -> {b}" for a, b in renamed[:4]) + (f" (+{len(renamed) - 4})" if len(renamed) > 4 else "")
        click.echo(f"renamed: {shown}")
    click.echo(f"wrote {dst}")


# ---------------------------------------------------------------------------------------- features
@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="output .npy")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="USFM_latest.pth or a usfm-edge .safetensors (random weights if omitted, with a warning)")
@click.option("--model", default="usfm_vit_base_patch16_224", show_default=True, help="preset name")
@click.option("--pool", type=click.Choice(["cls", "avg"]), default="cls", show_default=True,
              help="cls token after the final norm, or mean of the patch tokens")
@click.option("--batch-size", default=8, show_default=True)
def features(images, output, checkpoint, model, pool, batch_size):
    """Extract one embedding per frame (PNG/JPEG/TIFF/DICOM files or folders; cine DICOMs give one per frame).

    Writes OUTPUT (N, D) float32 and OUTPUT.json listing the source of each row.
    """
    import warnings

    from usfm_edge.evaluation.features import extract_features, save_features

    if checkpoint is None:
        click.secho("warning: no --checkpoint given: features come from RANDOM weights", fg="yellow", err=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the random-weights warning is printed above
        res = extract_features(images, checkpoint, model, pool, batch_size, progress=lambda f: _progress(f, "features"))
    save_features(output, res)
    click.echo(f"wrote {output} {res['features'].shape} and {output}.json")


# ----------------------------------------------------------------------------- pretrain / finetune
def _train_options(options):
    """Click options from ``train.options`` rows (torch-free), plus ``--out``, ``--config``, ``--resume``."""
    decos = [click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="run folder"),
             click.option("--config", "config", type=click.Path(exists=True, dir_okay=False), default=None,
                          help="YAML config (flags override it)"),
             click.option("--resume", is_flag=True, help="continue exactly from OUT/checkpoint.pt")]
    for opt in options:
        name, flag = opt.field.replace(".", "__"), opt.flag[2:]
        if opt.type is bool:
            decos.append(click.option(f"--{flag}/--no-{flag}", name, default=None, help=opt.help))
        else:
            decos.append(click.option(opt.flag, name, multiple=opt.type is list, default=None, help=opt.help,
                                      type=None if opt.type is list else opt.type))

    def deco(fn):
        for d in reversed(decos):
            fn = d(fn)
        return fn

    return deco


@main.command(context_settings=CONTEXT)
@_train_options(pretrain_options)
def pretrain(out, config, resume, **kwargs):
    """Dual masked image modelling pretraining (spatial + frequency band-stop masks).

    \b
    Example (CPU, tiny preset, all images of both real datasets):
      usfm-edge pretrain --data busbra:../shared/data/busbra --data hc18:../shared/data/hc18 \\
          --model usfm_vit_tiny_patch16_224 --out runs/pretrain_tiny --time-limit-min 30
    Multi-GPU: torchrun --nproc_per_node 8 -m usfm_edge.train.pretrain --data ... --out ...
    """
    from usfm_edge.train.config import load_pretrain_config
    from usfm_edge.train.pretrain import fit_pretrain

    cfg = load_pretrain_config(config, overrides_from(kwargs, pretrain_options))
    res = fit_pretrain(cfg, out, resume=(out if resume else None))
    click.echo(f"wrote {res.checkpoint}\nwrote {res.encoder}")


@main.command(context_settings=CONTEXT)
@_train_options(finetune_options)
def finetune(out, config, resume, **kwargs):
    """Fine-tune a segmentation, classification or enhancement head with few labels.

    \b
    Example (BUS-BRA lesion segmentation from a pretrained encoder with 10% of the patients' labels):
      usfm-edge finetune --task seg --data busbra:PATH --init runs/pretrain_tiny/encoder.safetensors \\
          --label-fraction 0.1 --out runs/busbra_seg_10
    """
    from usfm_edge.train.finetune import fit_finetune, load_finetune_config

    cfg = load_finetune_config(config, overrides_from(kwargs, finetune_options))
    res = fit_finetune(cfg, out, resume=(out if resume else None))
    click.echo(f"wrote {res.best}\nwrote {res.last}")


@main.command(context_settings=CONTEXT)
@_train_options(distill_options)
def distill(out, config, resume, **kwargs):
    """Distil a teacher into a small edge student: features of a backbone, or a fine-tuned seg model's logits.

    \b
    Examples (feature mode on unlabelled frames; task mode from a seg checkpoint into a thinner hybrid head):
      usfm-edge distill --teacher usfm_base.safetensors --student usfm_vit_tiny_patch16_224 \\
          --data folder:FRAMES@breast --out runs/kd_tiny --time-limit-min 60
      usfm-edge distill --teacher busbra_seg_tiny.safetensors --student usfm_vit_test --head-widths 8,16,32,64,128 \\
          --data busbra:PATH --out runs/kd_seg
    """
    from usfm_edge.train.distill import fit_distill, load_distill_config

    cfg = load_distill_config(config, overrides_from(kwargs, distill_options))
    res = fit_distill(cfg, out, resume=(out if resume else None))
    click.echo(f"{res.mode} distillation, {res.steps} steps\nwrote {res.student}")


@main.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--data", "data", multiple=True, required=True, help="data source (busbra:PATH, hc18:PATH, ...)")
@click.option("--split", type=click.Choice(["val", "train", "all"]), default="val", show_default=True,
              help="held-out patients (as in finetune), training patients, or everything")
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--split-seed", default=0, show_default=True)
@click.option("--limit", type=int, default=None, help="evaluate at most this many frames")
@click.option("--backend", default="auto", show_default=True, help="bundles: auto, onnxruntime, openvino, tensorrt")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the results here")
@click.option("--trusted-key", "trusted_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 public key (PEM, repeatable): refuse a bundle not signed by one of them")
def evaluate(source, data, split, val_fraction, split_seed, limit, backend, device, json_out, trusted_keys):
    """Score a fine-tuned checkpoint (.safetensors) or an exported bundle (NAME.usfm/) on real frames.

    Both go through the same graph and the same metrics, so fp32, fp16 and INT8 are directly comparable.
    """
    import json

    from usfm_edge.core.io import atomic_write_json
    from usfm_edge.evaluation.evaluate import evaluate as run

    res = run(source, list(data), split=split, val_fraction=val_fraction, seed=split_seed, limit=limit,
              backend=backend, device=device, trusted_keys=list(trusted_keys) or None)
    click.echo(res["scored"]["text"], err=True)
    click.echo(json.dumps(res, indent=2))
    if json_out:
        atomic_write_json(json_out, res)
        click.echo(f"wrote {json_out}")


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


@main.command(context_settings=CONTEXT)
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
              help="HxW of the scanner's frames, for static-shape targets (jetson, tensorrt); default: the model "
                   "input size, with a warning")
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
@main.command(context_settings=CONTEXT)
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
                       device=device, torch_bf16=torch_bf16, progress=_progress, memory=not no_memory,
                       fps=fps, isolate=not one_process, rounds=rounds, spin=not no_spin, peer=peer)
    command = "usfm-edge bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    click.echo(markdown(result, command))
    for p in write_all(result, json_out, md_out, png_out, command):
        click.echo(f"wrote {p}")


def _progress(it, label):
    """click's progress bar on stderr, as a plain iterator wrapper."""
    with click.progressbar(it, label=label, file=sys.stderr) as bar:
        yield from bar


# ---------------------------------------------------------------------------------------------- predict
@main.command(context_settings=CONTEXT)
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
@main.command(context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for signing.key (private, mode 0600) and signing.pub")
@click.option("--force", is_flag=True, help="replace an existing key pair")
def keygen(out, force):
    """Make an Ed25519 key pair for signing bundles (needs usfm-edge[sign])."""
    from usfm_edge.runtime.signing import generate_keypair, key_id, load_public_keys

    priv, pub = generate_keypair(out, force=force)
    click.echo(f"wrote {priv} (keep it secret) and {pub} (key id {key_id(load_public_keys([pub])[0])})")


@main.command(context_settings=CONTEXT)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="signing.key from usfm-edge keygen")
def sign(bundle, key):
    """Verify BUNDLE and write its SIGNATURE (Ed25519 over the bytes of SHA256SUMS)."""
    from usfm_edge.runtime.signing import sign_bundle

    click.echo(f"wrote {sign_bundle(bundle, key)}")


# -------------------------------------------------------------------------------------------- demo
@main.command(context_settings=CONTEXT)
@click.option("--out", default="demo_out", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--runs", default=20, show_default=True, help="timed runs per variant in the benchmark")
@click.option("--no-int8", is_flag=True, help="skip the INT8 exports")
def demo(out, runs, no_int8):
    """The whole pipeline on the bundled real sample: export, INT8 behind the accuracy gate, predict, bench."""
    from usfm_edge.bench.demo import run_demo

    run_demo(out, runs=runs, int8=not no_int8)


# ---------------------------------------------------------------------------------------------- quantize
@main.command(context_settings=CONTEXT)
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
@click.option("--recipe", type=click.Choice(["transformer", "transformer-accurate", "transformer-no-smoothquant"]),
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


if __name__ == "__main__":  # pragma: no cover
    main()
