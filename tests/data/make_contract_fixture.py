"""Regenerate ``contract_d44070c.npz``: outputs of bundles exported by usfm-edge at commit d44070c (before issue 16).

The file pins what a bundle computes on real sample frames, so the refactor of issue 16 ("one owner for the
model contract") can be checked to change no output (``tests/test_contract_fixture.py``). It was generated
with the code of d44070c::

    git worktree add /tmp/ref16 d44070c
    cd /tmp/ref16 && PYTHONPATH=/tmp/ref16 python /path/to/tests/data/make_contract_fixture.py OUT.npz

The script runs on later code too (it then writes what that code computes, for comparison): at d44070c a
static-shape (jetson) bundle refused frames of another size, so frames were fitted with
``evaluation.evaluate.StaticSizeAdapter``; later the ``Engine`` fits them itself.

The model is a seeded ``usfm_vit_test`` seg model at 64 px with the light head and a sharpened classifier
(:func:`fixture_checkpoint`; the same weights at every commit since the model code is unchanged), so the fixture
does not depend on the bundled demo checkpoints, which are retrained from time to time. Stored per bundle
(``onnx`` fp32, ``jetson`` fp16 at its default 64x64 frame size) and frame (HC18 ``007_HC.png`` 540x800, a 352x276 crop of BUS-BRA
``bus_0856-l.png``, BUS-BRA ``bus_0090-l.png`` 298x277): the mask and the lesion probability on every 4th
pixel (float16).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from usfm_edge.data import read_image, sample_dir

STEP = 4


def fixture_checkpoint(folder: str | Path) -> Path:
    """The fixture's model: seeded test preset, light head, classifier scaled so masks are not empty."""
    import torch

    from usfm_edge.models.tasks import build_task_model, save_task_checkpoint

    torch.manual_seed(0)
    model = build_task_model("seg", "usfm_vit_test", img_size=64, head="light", labels=["background", "lesion"])
    with torch.no_grad():
        model.head.cls_seg.weight.mul_(200.0)
    return save_task_checkpoint(model.eval(), Path(folder) / "fixture_seg.safetensors")


def fixture_frames() -> dict[str, np.ndarray]:
    root = sample_dir()
    return {"hc18_540x800": read_image(root / "hc18" / "training_set" / "007_HC.png"),
            "busbra_352x276": np.ascontiguousarray(read_image(root / "busbra" / "Images" / "bus_0856-l.png")[:352, :276]),
            "busbra_298x277": read_image(root / "busbra" / "Images" / "bus_0090-l.png")}


def predictor(engine):
    static = engine.meta.input.static_hw
    try:
        from usfm_edge.evaluation.evaluate import StaticSizeAdapter  # d44070c: callers fitted static frames
    except ImportError:
        return engine
    return StaticSizeAdapter(engine, static) if static else engine


def outputs(folder: Path) -> dict[str, np.ndarray]:
    from usfm_edge.runtime import Engine

    out = {}
    with Engine.open(folder, backend="onnxruntime", device="cpu", threads=1) as engine:
        pred = predictor(engine)
        for name, frame in fixture_frames().items():
            res = pred.predict(frame)
            out[f"{name}/mask"] = res.mask
            out[f"{name}/lesion"] = res.probs[1, ::STEP, ::STEP].astype(np.float16)
    return out


def main(dst: str) -> None:
    from usfm_edge.export import export

    arrays = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = fixture_checkpoint(tmp)
        for target in ("onnx", "jetson"):
            bundle = export(ckpt, target=target, out=Path(tmp) / f"{target}.usfm")
            arrays.update({f"{target}/{k}": v for k, v in outputs(bundle).items()})
    np.savez_compressed(dst, **arrays)
    print(f"wrote {dst} ({Path(dst).stat().st_size / 1e3:.0f} kB, {len(arrays)} arrays)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).with_name("contract_d44070c.npz")))
