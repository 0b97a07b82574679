"""Turn fine-tuning runs into the bundled demo checkpoints (fp16 safetensors, <= 20 MB each).

    python benchmarks/make_demo_checkpoints.py --busbra runs/busbra_hybrid/last.safetensors \
        --hc18 runs/hc18_hybrid_pt/last.safetensors \
        --busbra-student runs/kd_busbra_nano160_s2/student.safetensors --hc18-student runs/kd_hc18_nano192_s2/student.safetensors

Each flag is optional: a checkpoint not given stays as it is shipped (its README line is rebuilt from the
provenance in its own metadata), so the students can be replaced without the teachers' training runs.

(the two ``usfm-edge finetune`` runs and their held-out figures are in ``benchmarks/RESULTS.md`` §1). The last (EMA) weights are shipped, not the best validation checkpoint: the held-out
patients then stay untouched by model selection.

The provenance (source run, its config and validation metrics) is kept in each file's metadata and in
``usfm_edge/assets/checkpoints/README.md``.
"""

from __future__ import annotations

import argparse
import json

from usfm_edge.bench.demo import DEMO_CHECKPOINTS, DEMO_STUDENTS, checkpoints_dir
from usfm_edge.models.tasks import load_task_model, save_task_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--busbra", help="usfm-edge finetune run's last.safetensors (default: keep the shipped one)")
    p.add_argument("--hc18")
    p.add_argument("--busbra-student", help="usfm-edge distill run's student.safetensors")
    p.add_argument("--hc18-student")
    args = p.parse_args()
    out = checkpoints_dir()
    out.mkdir(parents=True, exist_ok=True)
    heads = {"hires": "the `hires` head (conv stem at strides 2/4/8 fused with the ViT maps)",
             "hybrid": "the `hybrid` head (a conv U-Net on the frame whose stride-16 bottleneck adds the ViT maps)"}
    head = load_task_model(args.busbra or out / DEMO_CHECKPOINTS["busbra"]).head_name
    lines = ["# Demo checkpoints", "",
             f"Tiny USFM backbones (`usfm_vit_tiny_patch16_224` architecture) with {heads.get(head, head)},",
             "trained on the training patients of the shared",
             "BUS-BRA and HC18 data by `usfm-edge finetune` with the ultrasound recipe (commands and held-out figures in",
             "`benchmarks/RESULTS.md` §1), stored as fp16 (the EMA weights of the run).",
             "They are research models, not medical devices. Training data licences: BUS-BRA (MIT-style), HC18",
             "(CC BY 4.0); see `../sample/README.md`.", ""]
    jobs = [(DEMO_CHECKPOINTS["busbra"], args.busbra), (DEMO_CHECKPOINTS["hc18"], args.hc18),
            (DEMO_STUDENTS["busbra"], args.busbra_student), (DEMO_STUDENTS["hc18"], args.hc18_student)]
    for i, (name, src) in enumerate(jobs):
        if i == 2:
            lines += ["", "Edge students distilled from the two models above by `usfm-edge distill` (task mode: the teacher's",
                      "soft masks + the labels, same patients and recipe; `usfm_vit_nano_patch16_224` backbone, 4 blocks of",
                      "width 96, with a thin `hybrid` head whose first conv has stride 2; commands and figures in",
                      "`benchmarks/RESULTS.md` §9):", ""]
        model = load_task_model(src or out / name)
        extra = dict(getattr(model, "checkpoint_config", {}).get("extra", {}) or {})
        dst = out / name
        if src:
            extra["demo_source"] = str(src)
            save_task_checkpoint(model, dst, extra=extra, half=True)
            print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB)")
        size = dst.stat().st_size / 1e6
        metrics = extra.get("metrics", {})
        stride = model.head_args.get("stem_stride", 1)
        lines.append(f"- `{dst.name}` ({size:.1f} MB): {model.preset}, task {model.task}, head {model.head_name} "
                     f"{model.head_args.get('widths', '')}" + (f" (stem stride {stride})" if stride != 1 else "") +
                     f", labels {model.labels}, input {model.img_size} px, from `{extra.get('demo_source')}`; "
                     "held-out metrics: " + json.dumps({k: round(v, 4) for k, v in metrics.items()
                                                        if isinstance(v, float)}))
    (out / "README.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
