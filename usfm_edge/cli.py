"""usfm-edge command line: thin click commands over the Python API.

This module holds the group, ``info``, ``convert-weights``, ``features`` and the training commands (``pretrain``,
``finetune``, ``distill``, ``evaluate``); the deployment commands live in ``usfm_edge.cli_deploy`` and are attached
to the group here.

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

from usfm_edge.cli_common import CONTEXT, progress
from usfm_edge.cli_deploy import bench, demo, export, keygen, predict, quantize, sign
from usfm_edge.train.options import distill_options, finetune_options, overrides_from, pretrain_options


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
        res = extract_features(images, checkpoint, model, pool, batch_size, progress=lambda f: progress(f, "features"))
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
      usfm-edge distill --teacher busbra_seg_tiny.safetensors --student usfm_vit_test --head-widths 16,32,64,128 \\
          --head-stride 2 --data busbra:PATH --out runs/kd_seg
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


# ---------------------------------------------------------------- deployment commands (usfm_edge.cli_deploy)
for _command in (export, quantize, bench, predict, keygen, sign, demo):
    main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
