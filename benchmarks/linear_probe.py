"""Frozen-encoder probes: how much does an encoder's representation know about ultrasound, before fine-tuning?

A diagnostic for the label-efficiency question (issue #3): fine-tuning results mix what the encoder learnt in
pretraining with what the fine-tuning budget can add. Here the encoder is frozen and only a linear map is fitted
(closed-form ridge regression in numpy, regularisation chosen on the training patients by 5-fold CV), on the same
patient-level split as fine-tuning (seed 0, 20% of patients held out):

- ``busbra-cls``: benign vs malignant from the mean of the final patch tokens -> held-out AUC;
- ``busbra-seg`` / ``hc18-seg``: per 16x16 patch token, the fraction of the patch inside the lesion / head ->
  held-out patch-level AUC (threshold-free: patches >= 50% inside the reference mask are positives) and Dice
  on the patch grid, thresholded where the training patients' Dice is best.

Also reported: the effective rank of the held-out patch tokens (``exp`` of the entropy of the normalised
singular values, after centring), a collapse check: an encoder that maps every patch to a few directions
(e.g. only its mean brightness) has a low rank whatever the probe.

Encoders: ``random`` (the preset's initialisation, seed 0) and any checkpoint (``usfm-edge`` encoder,
``USFM_latest.pth``, SimMIM), all at the same input size.

    python benchmarks/linear_probe.py --encoders random,checkpoints/pretrain_tiny256_encoder_fp16.safetensors \\
        --img-size 128 --out benchmarks/results/linear_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _frames(records, size: int, want_mask: bool):
    from usfm_edge.core.preprocess import PreprocessSpec, preprocess
    from usfm_edge.data.readers import read_image
    from usfm_edge.data.sources import read_record_mask

    spec = PreprocessSpec(img_size=size)
    xs, fracs = [], []
    g = size // 16
    for r in records:
        xs.append(preprocess(read_image(r.image), spec))
        if want_mask:
            m = read_record_mask(r) > 0
            h, w = m.shape
            # fraction of each patch inside the mask, on the (g x g) patch grid of the resized frame
            ys = (np.arange(h) * g // h)
            xs_ = (np.arange(w) * g // w)
            cnt = np.zeros((g, g))
            np.add.at(cnt, (ys[:, None].repeat(w, 1), xs_[None, :].repeat(h, 0)), m)
            area = np.bincount(ys, minlength=g)[:, None] * np.bincount(xs_, minlength=g)[None, :]
            fracs.append(cnt / area)
    return np.stack(xs).astype(np.float32), (np.stack(fracs) if want_mask else None)


def _group_ids(records) -> np.ndarray:
    """Stable integer id per (organ, patient) (Python's str hash changes between processes)."""
    ids: dict = {}
    return np.array([ids.setdefault((r.organ, r.patient), len(ids)) for r in records])


def _features(encoder, x: np.ndarray, batch: int = 64) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            tok = encoder.forward_features(torch.from_numpy(x[i:i + batch]))
            out.append(tok[:, 1:].numpy())  # patch tokens after the final norm
    return np.concatenate(out)  # (N, P, D)


def _ridge_fit(f: np.ndarray, y: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sd
    z1 = np.c_[z, np.ones(len(z))]
    reg = lam * np.eye(z1.shape[1])
    reg[-1, -1] = 0.0
    w = np.linalg.solve(z1.T @ z1 + reg, z1.T @ y)
    return w, mu, sd


def _ridge_predict(model, f: np.ndarray) -> np.ndarray:
    w, mu, sd = model
    return np.c_[(f - mu) / sd, np.ones(len(f))] @ w


def _choose_lambda(f, y, groups, score, lams=(0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)) -> float:
    """Ridge strength by 5-fold cross-validation over training groups (patients): never sees held-out data."""
    ug = np.unique(groups)
    folds = np.random.default_rng(0).permutation(len(ug)) % 5
    best, best_s = lams[0], -np.inf
    for lam in lams:
        s = []
        for k in range(5):
            te = np.isin(groups, ug[folds == k])
            s.append(score(_ridge_predict(_ridge_fit(f[~te], y[~te], lam), f[te]), y[te], te))
        if np.nanmean(s) > best_s:
            best, best_s = lam, float(np.nanmean(s))
    return best


def _patch_dice(pred: np.ndarray, frac: np.ndarray) -> float:
    """Mean per-image Dice on the patch grid; pred/frac ``(N, P)``."""
    p, t = pred >= 0.5, frac >= 0.5
    inter = (p & t).sum(1)
    den = p.sum(1) + t.sum(1)
    return float(np.mean(np.where(den > 0, 2 * inter / np.maximum(den, 1), 1.0)))


def effective_rank(tokens: np.ndarray) -> float:
    """``exp(entropy(s / sum(s)))`` of the singular values ``s`` of centred ``(n, D)`` features (1 .. D)."""
    f = tokens.reshape(-1, tokens.shape[-1]).astype(np.float64)
    s = np.linalg.svd(f - f.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def _best_threshold(pred: np.ndarray, frac: np.ndarray) -> float:
    grid = np.quantile(pred, np.linspace(0.05, 0.95, 37))
    return float(max(grid, key=lambda t: _patch_dice(pred - t + 0.5, frac)))


def probe(encoders: list[str], size: int, model: str, limit: int | None) -> dict:
    import torch

    from usfm_edge.core.metrics import roc_auc
    from usfm_edge.data.sources import load_records
    from usfm_edge.data.splits import patient_split
    from usfm_edge.models import create_model

    torch.set_num_threads(1)
    data = {}
    for name, spec, seg in (("busbra", f"busbra:{SHARED / 'busbra'}", True), ("hc18", f"hc18:{SHARED / 'hc18'}", True)):
        recs = load_records(spec)
        tr, va = patient_split(recs, val_fraction=0.2, seed=0)
        if limit:
            tr, va = tr[:limit], va[: max(1, limit // 4)]
        xtr, ftr = _frames(tr, size, seg)
        xva, fva = _frames(va, size, seg)
        data[name] = dict(tr=tr, va=va, xtr=xtr, xva=xva, ftr=ftr, fva=fva,
                          gtr=_group_ids(tr))
    results = {}
    for enc_name in encoders:
        torch.manual_seed(0)
        enc = create_model(model, checkpoint=None if enc_name == "random" else enc_name, img_size=size).eval()
        t0 = time.time()
        row = {}
        for name, d in data.items():
            htr, hva = _features(enc, d["xtr"]), _features(enc, d["xva"])
            if name == "busbra":  # classification: mean patch token -> benign (0) / malignant (1)
                ytr = np.array([r.label for r in d["tr"]], float)
                yva = np.array([r.label for r in d["va"]], float)
                ftr, fva = htr.mean(1), hva.mean(1)
                lam = _choose_lambda(ftr, ytr, d["gtr"], lambda p, y, _: roc_auc(p, y.astype(int)))
                row["busbra-cls_auc"] = roc_auc(_ridge_predict(_ridge_fit(ftr, ytr, lam), fva), yva.astype(int))
                row["busbra-cls_lambda"] = lam
            n, p_, dim = htr.shape
            ptr, pva = d["ftr"].reshape(n, -1), d["fva"].reshape(len(hva), -1)
            gpatch = np.repeat(d["gtr"], p_)
            lam = _choose_lambda(htr.reshape(-1, dim), ptr.reshape(-1), gpatch,
                                 lambda p, y, _: roc_auc(p, (y >= 0.5).astype(int)))
            model_ = _ridge_fit(htr.reshape(-1, dim), ptr.reshape(-1), lam)
            thr = _best_threshold(_ridge_predict(model_, htr.reshape(-1, dim)).reshape(-1, p_), ptr)
            pred = _ridge_predict(model_, hva.reshape(-1, dim))
            row[f"{name}-seg_patch_auc"] = roc_auc(pred, (pva.reshape(-1) >= 0.5).astype(int))
            row[f"{name}-seg_patch_dice"] = _patch_dice(pred.reshape(-1, p_) - thr + 0.5, pva)
            row[f"{name}-seg_lambda"] = lam
            row[f"{name}-effective_rank"] = effective_rank(hva)
        row["seconds"] = round(time.time() - t0, 1)
        results[enc_name] = row
        print(json.dumps({enc_name: row}), flush=True)
    return {"img_size": size, "model": model,
            "n": {k: {"train": len(v["tr"]), "val": len(v["va"])} for k, v in data.items()}, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", default="random", help="comma-separated: random and/or checkpoint paths")
    ap.add_argument("--img-size", type=int, default=128)
    ap.add_argument("--model", default="usfm_vit_tiny_patch16_224")
    ap.add_argument("--limit", type=int, default=None, help="at most this many training frames per dataset (smoke)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    res = probe(args.encoders.split(","), args.img_size, args.model, args.limit)
    from usfm_edge.bench.sysinfo import machine_info

    res["machine"] = machine_info()
    res["command"] = "python benchmarks/linear_probe.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out")
    if args.out:
        from usfm_edge.core.io import atomic_write_json

        atomic_write_json(args.out, res)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
