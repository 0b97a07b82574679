"""INT8 end to end: ``make_quantizer`` (the exporter's hook) and ``quantize_bundle`` (an fp32 bundle -> INT8).

    from usfm_edge.export import export
    from usfm_edge.calibration import make_quantizer
    export("seg.safetensors", "openvino", "int8", quantizer=make_quantizer(["busbra:data/busbra"]))

What one quantisation does (``_quantize``):

1. Held-out patients: ``val_specs`` when given, else a seeded 20 % patient split of the calibration sources
   (``evaluation.split_records``, the split fine-tuning and evaluation use). Their images never enter the calibration set.
2. Calibration set (``calibset.build_calibration_set``): up to ``n`` real frames of the other patients,
   balanced across organ and scanner; its manifest goes into the report and its SHA-256 into ``usfm.json``.
3. Backend by target: openvino -> NNCF PTQ; onnx -> ONNX Runtime Q/DQ; jetson/tensorrt -> TensorRT Q/DQ.
4. Accuracy gate (``gate.accuracy_gate``) on the held-out frames (none at all: DataError unless ``force``). On OpenVINO a failed gate is retried once
   with NNCF accuracy control (``recipe.accuracy_control="auto"``). Still failing: a sensitivity report is
   added and ``ValidationError`` is raised with the numbers, unless ``force``.

The minimum calibration size defaults to 32 frames; ``USFM_EDGE_MIN_CALIB_FRAMES`` lowers it for pilot data
(e.g. the bundled 22-image sample in the tests); ``force`` turns the refusal into a warning.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from usfm_edge.calibration.backends import quantize as run_backend
from usfm_edge.calibration.backends.common import read_contract
from usfm_edge.calibration.calibset import MIN_FRAMES, build_calibration_set
from usfm_edge.calibration.gate import accuracy_gate, sensitivity_report
from usfm_edge.calibration.recipe import QuantRecipe, get_recipe
from usfm_edge.core.bundle_schema import BundleMeta
from usfm_edge.core.errors import ConfigError, DataError, ExportError, ValidationError
from usfm_edge.evaluation.records import read_frame, read_mask, select_records, split_records

__all__ = ["make_quantizer", "quantize_bundle", "held_out_split", "min_frames_default"]

log = logging.getLogger(__name__)
_ARTIFACT_KEY = {"openvino": "openvino_xml", "onnxruntime": "onnx", "tensorrt": "onnx"}


def min_frames_default() -> int:
    """Minimum calibration size: ``USFM_EDGE_MIN_CALIB_FRAMES`` if set, else 32."""
    value = os.environ.get("USFM_EDGE_MIN_CALIB_FRAMES")
    try:
        return max(1, int(value)) if value else MIN_FRAMES
    except ValueError:
        raise ConfigError(f"USFM_EDGE_MIN_CALIB_FRAMES must be an integer, got {value!r}") from None


def _key(r) -> str:
    return f"{r.organ}/{r.patient}"


def held_out_split(records: Sequence, val_specs: Sequence[str] | None = None, seed: int = 0,
                   val_fraction: float = 0.2) -> tuple[list, set[str], str]:
    """Held-out records for the gate and the patient keys to keep out of calibration.

    Returns:
        ``(held-out records, excluded "organ/patient" keys, description)``.
    """
    if val_specs:
        val = select_records(list(val_specs), split="all")
        return val, {_key(r) for r in val}, f"{len(val)} frames of {', '.join(val_specs)}"
    try:
        val = split_records(records, "val", val_fraction=val_fraction, seed=seed)
    except DataError:
        return [], set(), "no held-out patients (the calibration sources hold a single patient)"
    keys = {_key(r) for r in val}
    return val, keys, f"{len(val)} frames of {len(keys)} patients split off the calibration sources (seed {seed})"


def _validation_items(task: str, records: Sequence) -> list:
    from usfm_edge.calibration.backends.nncf_openvino import ValidationItem

    if task == "seg":
        return [ValidationItem(read_frame(r), read_mask(r) > 0) for r in records if r.mask is not None]
    if task == "cls":
        return [ValidationItem(read_frame(r), int(r.label)) for r in records if r.label is not None]
    return []  # enhance/features: no per-frame metric NNCF can optimise here


def _quantize(model_path: Path, meta: BundleMeta, backend: str, workdir: Path, *, calib_specs: Sequence[str],
              recipe: QuantRecipe, max_drop: float | None, force: bool, n: int, seed: int,
              val_specs: Sequence[str] | None, organs: Sequence[str] | None, min_frames: int | None,
              manifest_out: str | Path | None) -> dict:
    t0 = time.perf_counter()
    recipe = recipe.for_head((meta.model or {}).get("head"), meta.task).for_backend(backend)
    specs = list(calib_specs)
    if not specs:
        raise ConfigError("INT8 needs a real ultrasound calibration set: give at least one data source",
                          hint="--calib busbra:PATH (repeatable)")
    records = select_records(specs, split="all")
    held, excluded, held_desc = held_out_split(records, val_specs, seed)
    if not held and not force:
        raise DataError(f"no held-out frames for the INT8 accuracy gate: {held_desc}",
                        hint="add sources with more patients, pass held-out sources (--val), or force=True")
    calib = build_calibration_set(specs, n=n, seed=seed, exclude_patients=excluded, organs=organs,
                                  min_frames=min_frames if min_frames is not None else min_frames_default(),
                                  strict=not force, records=records)
    if manifest_out:
        calib.save_manifest(manifest_out)
    calib.save_manifest(workdir / "calibration_manifest.json")
    drop_limit = recipe.max_drop_for(meta.task) if max_drop is None else float(max_drop)
    items = _validation_items(meta.task, held) if backend == "openvino" and recipe.accuracy_control != "never" \
        else []
    attempts = []
    validation = items if recipe.accuracy_control == "always" and items else None
    while True:
        out_dir = workdir / f"int8-{len(attempts)}"
        artifact, details = run_backend(model_path, calib, recipe, out_dir, backend, meta, validation, drop_limit)
        gate = accuracy_gate(model_path, artifact, meta, held, recipe, backend, drop_limit) if held else \
            {"passed": True, "failures": [], "notes": [held_desc], "skipped": True}
        attempts.append({"mode": details.get("mode", "ptq"), "passed": gate["passed"], "failures": gate["failures"]})
        metric_failed = gate.get("drop") is not None and drop_limit is not None and gate["drop"] > drop_limit
        if not metric_failed or validation is not None or not items or recipe.accuracy_control != "auto":
            break  # accuracy control optimises the task metric only: no use for a fidelity-only failure
        log.warning("INT8 gate failed (%s); retrying with NNCF accuracy control", "; ".join(gate["failures"]))
        validation = items
    report = {"backend": backend, "recipe": recipe.to_dict(), "calibration": calib.report(),
              "manifest": calib.manifest(), "held_out": held_desc, "quantizer": details, "gate": gate,
              "attempts": attempts,
              # the exporter's parity check of the INT8 bundle runs on frames of the model's own domain
              "parity_frames": [str(r.image) for r in held[:: max(1, len(held) // 4)][:4]]}
    if not gate["passed"]:
        probe = [read_frame(r) for r in held[:4]] or calib.frames[:4]  # real held-out frames first
        report["sensitivity"] = sensitivity_report(model_path, artifact, meta, probe, backend, workdir,
                                                   recipe.sensitivity_top_k)
        worst = ", ".join(f"{r['layer']} (+{r['added']:.3f})" for r in report["sensitivity"].get("layers", []))
        msg = f"INT8 accuracy gate failed ({backend}): " + "; ".join(gate["failures"])
        if worst:
            msg += f"; most sensitive layers: {worst}"
        if not force:
            raise ValidationError(msg, path=model_path, results=report["gate"] | {"sensitivity": report["sensitivity"]},
                                  hint="improve the calibration set, keep the listed layers float, or force=True")
        log.warning("%s (kept because force=True)", msg)
        report["forced"] = True
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return {_ARTIFACT_KEY[backend]: Path(artifact), "manifest_sha256": calib.manifest_sha256,
            "thresholds": dict(recipe.parity), "report": report}


def make_quantizer(calib_specs: Sequence[str], max_drop: float | None = None, force: bool = False, n: int = 300,
                   seed: int = 0, recipe: QuantRecipe | str | None = None, val_specs: Sequence[str] | None = None,
                   organs: Sequence[str] | None = None, min_frames: int | None = None,
                   manifest_out: str | Path | None = None) -> Callable[[Path, object, Path], dict]:
    """The INT8 hook of ``usfm_edge.export.export(..., quantizer=...)``.

    Args:
        calib_specs: data sources of real frames (``busbra:PATH``, ``hc18:PATH``, ``folder:PATH@organ``...).
        max_drop: allowed task-metric drop vs fp32 on held-out frames (None = recipe/task default).
        force: keep an artifact that fails the gate (recorded in the report) and accept a small set.
        n: calibration frames wanted.
        seed: sampling and split seed.
        recipe: a ``QuantRecipe`` or preset name (default ``transformer``).
        val_specs: held-out sources for the gate (default: a patient split of ``calib_specs``).
        organs: organs the model was trained on (a single-organ calibration set then warns).
        min_frames: refuse smaller calibration sets (default ``min_frames_default()``).
        manifest_out: also write the calibration manifest here.

    Returns:
        ``quantizer(onnx_fp32, target, workdir) -> {"onnx" | "openvino_xml", "manifest_sha256", "thresholds",
        "report"}``.
    """
    rec = get_recipe(recipe)
    specs = [calib_specs] if isinstance(calib_specs, str) else list(calib_specs)

    def quantizer(onnx_fp32: Path, target, workdir: Path) -> dict:
        backend = getattr(target, "backend", str(target))
        return _quantize(Path(onnx_fp32), read_contract(onnx_fp32), backend, Path(workdir), calib_specs=specs,
                         recipe=rec, max_drop=max_drop, force=force, n=n, seed=seed, val_specs=val_specs,
                         organs=organs, min_frames=min_frames, manifest_out=manifest_out)

    quantizer.settings = dict(calib_specs=specs, recipe=rec, max_drop=max_drop, force=force, n=n,  # type: ignore
                              seed=seed, val_specs=val_specs, organs=organs, min_frames=min_frames,
                              manifest_out=manifest_out)
    return quantizer


def _find_checkpoint(bundle: Path, meta, explicit: str | Path | None) -> Path | None:
    from usfm_edge.runtime.bundle_io import sha256_file

    src = meta.source or {}
    name = src.get("checkpoint")
    candidates = [Path(explicit)] if explicit else ([bundle.parent / name, Path.cwd() / name] if name else [])
    for c in candidates:
        if c.is_file():
            if src.get("sha256") and sha256_file(c) != src["sha256"]:
                log.warning("%s is not the checkpoint this bundle was exported from (SHA-256 differs)", c)
                continue
            return c
    return None


def quantize_bundle(bundle_path: str | Path, calib_specs: Sequence[str], out: str | Path | None = None,
                    max_drop: float | None = None, force: bool = False, *, checkpoint: str | Path | None = None,
                    recipe: QuantRecipe | str | None = None, n: int = 300, seed: int = 0,
                    val_specs: Sequence[str] | None = None, manifest_out: str | Path | None = None,
                    overwrite: bool = True) -> Path:
    """Make the INT8 bundle of an exported fp32 (or fp16 TensorRT) bundle.

    Preferred path: the bundle's source checkpoint (``usfm.json`` source name + SHA-256, looked up next to
    the bundle and in the current folder, or ``checkpoint``) is re-exported with
    ``usfm_edge.export.export(ckpt, target, "int8", quantizer=make_quantizer(...))``: same graph options,
    parity against PyTorch. Without it, the bundle's own fp32 ONNX / IR is quantised directly
    and parity is measured against the fp32 bundle; TensorRT bundles need the checkpoint (their build script depends on
    the precision).

    ``overwrite=False`` (the CLI's default) refuses an existing bundle at ``out`` before any calibration work.

    Returns:
        the INT8 bundle (default ``<name>-int8.usfm`` next to the source bundle).
    """
    from usfm_edge.runtime.bundle_io import verify_bundle

    bundle = Path(bundle_path)
    meta = verify_bundle(bundle)
    if meta.precision == "int8":
        raise ConfigError(f"{bundle.name} is already INT8", hint="quantise the fp32 bundle (or the checkpoint)")
    stem = meta.name or bundle.name.removesuffix(".usfm")
    stem = stem[: -len("-fp32")] if stem.endswith("-fp32") else stem[: -len("-fp16")] if stem.endswith("-fp16") else stem
    out = Path(out) if out else bundle.parent / f"{stem}-int8.usfm"
    if out.exists() and not overwrite:
        raise ExportError("bundle already exists; refusing to replace it", path=out,
                          hint="pass --force (Python: overwrite=True) or choose another --out")
    quantizer = make_quantizer(calib_specs, max_drop=max_drop, force=force, n=n, seed=seed, recipe=recipe,
                               val_specs=val_specs, manifest_out=manifest_out)
    ckpt = _find_checkpoint(bundle, meta, checkpoint)
    band = meta.band_stop or {}
    reproducible = not band.get("enabled") or band.get("rings") is not None
    if ckpt is not None and reproducible:
        from usfm_edge.export import export, export_config_from_meta  # torch is needed on this path only

        return export(ckpt, export_config_from_meta(meta, precision="int8", out=out, force=force, quantizer=quantizer,
                                                    overwrite=overwrite))
    return _quantize_files(bundle, meta, out, quantizer)


def _quantize_files(bundle: Path, meta, out: Path, quantizer) -> Path:
    """Quantise a bundle's own fp32 ONNX / IR (no checkpoint) and write the INT8 bundle next to it.

    The parity record is the gate's fidelity against the fp32 bundle on held-out frames (no PyTorch here).
    """
    import datetime as _dt
    import shutil

    from usfm_edge.core.bundle_schema import META_FILE, SUMS_FILE
    from usfm_edge.core.io import atomic_write_text
    from usfm_edge.export.bundle import BundleWriter
    from usfm_edge.runtime.bundle_io import DEVICE_BUILT_FILES, format_sums, sha256_file

    if meta.backend == "tensorrt":
        raise ConfigError("a TensorRT bundle can only be quantised from its checkpoint (its build script and "
                          "static ONNX are precision-specific)", path=bundle,
                          hint="pass checkpoint=PATH (usfm-edge quantize BUNDLE --checkpoint CKPT)")
    if meta.precision != "fp32":
        raise ConfigError(f"quantising needs an fp32 bundle, this one is {meta.precision}", path=bundle,
                          hint="export an fp32 bundle or pass the checkpoint")
    role = "openvino_xml" if meta.backend == "openvino" else "onnx"
    model = bundle / meta.files[role]
    with BundleWriter(out) as writer:  # cleans dead writers' temporaries of ``out``; atomic commit
        tmp = writer.path
        work = tmp.parent / f"{tmp.name}-work"
        work.mkdir()
        try:
            quant = _quantize(model, meta, meta.backend, work, **quantizer.settings)
            artifact = Path(quant[_ARTIFACT_KEY[meta.backend]])
            skip = {META_FILE, SUMS_FILE, *DEVICE_BUILT_FILES, meta.files[role], meta.files.get("openvino_bin", "")}
            for f in bundle.iterdir():
                if f.is_file() and f.name not in skip:
                    shutil.copyfile(f, tmp / f.name)
            shutil.copyfile(artifact, tmp / meta.files[role])
            if role == "openvino_xml":
                shutil.copyfile(artifact.with_suffix(".bin"), tmp / meta.files["openvino_bin"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        gate = quant["report"]["gate"]
        meta.precision = "int8"
        meta.name = out.name.removesuffix(".usfm")
        meta.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        meta.calibration = {"manifest_sha256": quant["manifest_sha256"], "report": quant["report"]}
        meta.thresholds = {**meta.thresholds, **quant["thresholds"]}
        meta.parity = {"passed": gate["passed"], "failures": gate["failures"], "reference": f"fp32 bundle {bundle.name}",
                       "backend": meta.backend, "frames": gate.get("frames", 0), "outputs": gate.get("fidelity", {})}
        meta.source = {**(meta.source or {}), "quantized_from": {"bundle": bundle.name,
                                                                 "usfm_json_sha256": sha256_file(bundle / META_FILE)}}
        meta.notes = [*meta.notes, "INT8 made from the bundle's fp32 model (source checkpoint not found): parity "
                                   "is measured against the fp32 bundle on held-out real frames"]
        atomic_write_text(tmp / META_FILE, meta.validate().to_json())
        sums = {f.name: sha256_file(f) for f in tmp.iterdir() if f.is_file() and f.name != SUMS_FILE}
        atomic_write_text(tmp / SUMS_FILE, format_sums(sums))
        return writer.commit()

