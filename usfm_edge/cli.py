"""usfm-edge command line: thin click commands over the Python API.

Every command imports what it needs inside its body, so ``usfm-edge --help`` is instant and never loads
torch. Exit codes (one place, used by every command):

====  ==============================================================
0     success
1     a domain error (bad input file, corrupt checkpoint, failed export...)
2     usage error (unknown option value, bad config key)
3     a parity or accuracy gate failed (ValidationError)
4     a backend is not installed (BackendUnavailableError; the message names the extra)
====  ==============================================================
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

CONTEXT = dict(help_option_names=["-h", "--help"], max_content_width=110)


def _handle_errors(fn):
    """Turn UsfmEdgeError into a one-line message on stderr and its documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from usfm_edge.core.errors import UsfmEdgeError

        try:
            return fn(*args, **kwargs)
        except UsfmEdgeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            results = getattr(exc, "results", None)
            if results:
                import json

                click.echo(json.dumps(results, indent=2, default=str), err=True)
            sys.exit(exc.exit_code)

    return wrapper


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="usfm-edge", prog_name="usfm-edge")
def main():
    """usfm-edge: the USFM ultrasound foundation model, from pretraining to a quantised edge engine."""


# --------------------------------------------------------------------------------------------- info
def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict[str, str]:
    out = {}
    try:
        import torch

        cuda = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        out["torch"] = ", ".join(["cpu", *cuda])
    except ImportError:
        out["torch"] = "not installed"
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ", ".join(ort.get_available_providers())
    except ImportError:
        out["onnxruntime"] = "not installed"
    try:
        import openvino as ov

        core = ov.Core()
        out["openvino"] = ", ".join(f"{d} ({core.get_property(d, 'FULL_DEVICE_NAME')})" for d in core.available_devices)
    except ImportError:
        out["openvino"] = "not installed"
    except Exception as exc:  # a broken driver must not break `info`
        out["openvino"] = f"error: {exc}"
    try:
        import tensorrt as trt  # noqa: F401
        import torch

        out["tensorrt"] = "usable" if torch.cuda.is_available() else "installed, but no CUDA GPU visible"
    except ImportError:
        out["tensorrt"] = "not installed (engines are built on the device: see the bundle's build_engine.sh)"
    return out


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
def info(as_json):
    """Versions of usfm-edge and its backends, and the devices each backend sees."""
    import platform

    versions = {d: _version(d) for d in ("usfm-edge", "torch", "onnx", "onnxruntime", "openvino", "nncf", "tensorrt")}
    devices = _devices()
    if as_json:
        import json

        click.echo(json.dumps({"versions": versions, "devices": devices, "python": platform.python_version(),
                               "machine": platform.machine()}, indent=2))
        return
    click.echo(f"python {platform.python_version()} on {platform.machine()} ({platform.system()})")
    for k, v in versions.items():
        click.echo(f"  {k:<12} {v}")
    click.echo("devices:")
    for k, v in devices.items():
        click.echo(f"  {k:<12} {v}")


# --------------------------------------------------------------------------------- convert-weights
@main.command("convert-weights", context_settings=CONTEXT)
@click.argument("src", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "dst", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="destination .safetensors")
@click.option("--model", default=None, help="preset name (inferred from the embedding width if omitted)")
@click.option("--half", is_flag=True, help="store fp16 weights")
@_handle_errors
def convert_weights(src, dst, model, half):
    """Convert USFM_latest.pth, a SimMIM checkpoint or ours to a usfm-edge .safetensors (strictly verified).

    \b
    Example:
      usfm-edge convert-weights USFM_latest.pth -o usfm_base.safetensors
    """
    from usfm_edge.core.errors import ConfigError
    from usfm_edge.models.checkpoint import convert_weights as convert

    if dst.suffix != ".safetensors":
        raise ConfigError(f"output must end in .safetensors, got '{dst.name}'")
    report = convert(src, dst, model_name=model, half=half)
    click.echo(report.summary())
    click.echo(f"wrote {dst}")


# ---------------------------------------------------------------------------------------- features
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")


def expand_inputs(paths) -> list[Path]:
    """Files as given, folders expanded recursively to their image/DICOM files (sorted)."""
    from usfm_edge.core.errors import DataError

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError("folder holds no PNG/JPEG/BMP/TIFF/DICOM files", path=p)
            out.extend(found)
        else:
            out.append(p)
    return out


@main.command(context_settings=CONTEXT)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="output .npy")
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="USFM_latest.pth or a usfm-edge .safetensors (random weights if omitted, with a warning)")
@click.option("--model", default="usfm_vit_base_patch16_224", show_default=True, help="preset name")
@click.option("--pool", type=click.Choice(["cls", "avg"]), default="cls", show_default=True,
              help="cls token after the final norm, or mean of the patch tokens")
@click.option("--batch-size", default=8, show_default=True)
@_handle_errors
def features(images, output, checkpoint, model, pool, batch_size):
    """Extract one embedding per frame (PNG/JPEG/TIFF/DICOM files or folders; cine DICOMs give one per frame).

    Writes OUTPUT (N, D) float32 and OUTPUT.json listing the source of each row.
    """
    import json

    import numpy as np
    import torch

    from usfm_edge.core.io import atomic_save_npy
    from usfm_edge.core.preprocess import PreprocessSpec, preprocess
    from usfm_edge.data.readers import iter_frames
    from usfm_edge.models import create_model
    from usfm_edge.models.checkpoint import read_checkpoint

    if checkpoint is None:
        click.secho("warning: no --checkpoint given: features come from RANDOM weights", fg="yellow", err=True)
    else:
        _, cfg = read_checkpoint(checkpoint) if checkpoint.suffix == ".safetensors" else (None, None)
        if cfg and cfg.get("model"):
            model = cfg["model"]
    net = create_model(model, checkpoint=checkpoint).eval()
    spec = PreprocessSpec(img_size=net.img_size[0])
    files = expand_inputs(images)
    rows, sources, batch = [], [], []

    def flush():
        with torch.inference_mode():
            tokens = net.forward_features(torch.from_numpy(np.stack(batch)))
            rows.append((tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(1)).numpy())
        batch.clear()

    with click.progressbar(files, label="features", file=sys.stderr) as bar:
        for f in bar:
            for i, frame in iter_frames(f):
                batch.append(preprocess(frame, spec))
                sources.append({"file": str(f), "frame": i})
                if len(batch) == batch_size:
                    flush()
    if batch:
        flush()
    feats = np.concatenate(rows).astype(np.float32)
    atomic_save_npy(output, feats)
    meta = {"model": model, "checkpoint": str(checkpoint) if checkpoint else None, "pool": pool, "rows": sources}
    Path(str(output) + ".json").write_text(json.dumps(meta, indent=1))
    click.echo(f"wrote {output} {feats.shape} and {output}.json")


if __name__ == "__main__":  # pragma: no cover
    main()
