"""``TorchPredictor``: a PyTorch task model run exactly like a bundle, through ``runtime.Engine``.

The model is wrapped in the graph export writes (``models.raw_frame.RawFrameModel``: resize, normalise,
model, post-processing at the frame's own size) and run on a torch "backend" under the graph's own contract
(``RawFrameModel.contract``), so ``predict`` / ``predict_batch`` / ``stream``, the result types, the checks of
the frame and the static-shape fitting are the Engine's own: an fp32 bundle and its checkpoint are scored
identically, and an INT8 bundle differs only by what quantisation changed.

torch is imported when a predictor is made, never at module level (evaluation runs on devices without it).
"""

from __future__ import annotations

import numpy as np

from usfm_edge.runtime.backends import Backend
from usfm_edge.runtime.engine import Engine

__all__ = ["TorchBackend", "TorchPredictor"]


class TorchBackend(Backend):
    """A ``RawFrameModel`` behind the runtime's backend interface: ``run(batch) -> {output name: array}``.

    Args:
        graph: the wrapped model (in eval mode).
        device: torch device of the graph.
    """

    name = "torch"

    def __init__(self, graph, device="cpu"):
        import torch

        self._torch = torch
        self.graph = graph
        self.device = torch.device(device)
        self.version = torch.__version__

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.graph(torch.from_numpy(np.require(x, requirements=["C", "W"])).to(self.device))
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.detach().cpu().numpy() for n, o in zip(self.graph.output_names, out)}


class TorchPredictor(Engine):
    """A ``TaskModel`` run in PyTorch through the export graph, with the ``Engine`` interface.

    Args:
        task_model: a ``TaskModel`` (``task``, ``labels``, ``preprocess``).
        spec: preprocessing contract (default: the model's own).
        device: torch device.
        band_stop_mask: optional ``(S, S)`` band-stop mask applied in the graph (or, ``bare``, in numpy).
        bare: run the plain model on normalised input (numpy pre/post-processing, as a bare bundle).
        static_hw: behave like a static-shape bundle of this frame size (frames fitted, outputs mapped back):
            the reference of a jetson/tensorrt bundle's parity gate.

    Attributes:
        graph: the ``RawFrameModel`` that runs (benchmarks swap its precision).
    """

    def __init__(self, task_model, spec=None, device: str = "cpu", *, band_stop_mask: np.ndarray | None = None,
                 bare: bool = False, static_hw: tuple[int, int] | None = None):
        from usfm_edge.core.preprocess import PreprocessSpec
        from usfm_edge.models.raw_frame import RawFrameModel

        spec = spec or getattr(task_model, "preprocess", None) or PreprocessSpec(img_size=task_model.img_size)
        if isinstance(spec, dict):
            spec = PreprocessSpec.from_dict(spec)
        graph = RawFrameModel(task_model, spec, None if bare else band_stop_mask, bare=bare, static_hw=static_hw)
        record = {"enabled": band_stop_mask is not None, "rings": None, "mask_sha256": None}
        meta = graph.contract(dynamic_hw=static_hw is None, static_hw=static_hw, band_stop=record)
        backend = TorchBackend(graph.to(device), device)
        super().__init__(None, meta, backend, band_stop_mask=band_stop_mask if bare else None)
        self.graph = graph
