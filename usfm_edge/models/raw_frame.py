"""In-graph pre- and post-processing: the deployed graph takes a raw uint8 frame and returns task outputs.

It lives with the models (below ``evaluation`` and ``export``): the exporter traces it to ONNX and
``evaluation.TorchPredictor`` runs it in PyTorch, so a checkpoint and its bundle compute the same thing.
:meth:`RawFrameModel.contract` describes the graph as a ``core.bundle_schema.BundleMeta`` (the one contract).

``RawFrameModel`` wraps a task model so the deployed graph does, inside itself::

    uint8 (B, H, W) -> float -> resize to S x S (bicubic, half-pixel, no antialias) -> / 255
        -> [band-stop filter as MatMuls] -> replicate to 3 channels -> (x - mean) / std -> task model
        -> seg: probs (B, K, H, W) (logits resized back bilinearly, softmax) + mask (B, H, W) uint8
           cls: probs (B, K) softmax;  enhance: restored (B, H, W) uint8;  features: features (B, D)

An any-size graph resizes the frame with resampling taps built in the graph from the frame's traced size, with
int64 tap indices, so one graph serves 540x800 and 300x260 frames: ``resize_taps`` (one axis at a time, the sum
over the kernel's taps of a ``Gather`` of source rows or columns times the tap weights: 2-4 multiply-adds per output
value) or ``resize_dense`` (the same taps as two dense MatMuls), both in ``models.resample``. Both are the resampling of
``F.interpolate(mode="bicubic", align_corners=False)`` and ``core.preprocess`` within 0.05 grey levels (tested),
instead of the dynamic-shape ONNX ``Resize(mode="cubic")`` that ONNX Runtime 1.32 runs in 6.94 ms on a 352x276
frame (benchmarks/RESULTS.md §4.5). The uint8 input feeds a ``Cast`` first: TensorRT accepts UINT8 only as a
network input/output.

Seg logits go back to the frame bilinearly. A two-class model (every shipped one) resizes only its logit difference
and takes sigmoid + compare (``binary_seg_post``); more classes take ``channel_softmax`` (ONNX ``Softmax`` on the
class axis is slow in ONNX Runtime) and argmax.

How a graph resizes is its ``resample`` choice (the exporter picks it per backend):

- ``gather`` (OpenVINO bundles): every resize is ``resize_taps``, both ways, any-size or static frame (a static
  frame makes its tap indices constants).
- ``matmul`` (ONNX Runtime and TensorRT bundles): any-size frames go down by ``resize_dense`` (the same taps as
  dense MatMuls, which ONNX Runtime runs faster than its ``Gather``) and the logits come back by ONNX ``Resize``
  (linear; ONNX Runtime's is fast). A **static frame size** (``static_hw``: jetson/tensorrt
  bundles, or ``--frame-size``) resizes with two MatMuls by precomputed interpolation matrices instead
  (``core.preprocess.resize_matrix``: the same bicubic a = -0.75, half-pixel, edge-clamped resampling as
  ``F.interpolate``, max abs difference ~1e-5 on real frames; tested): ``R_h (S x H) @ frame @ R_w^T (W x S)``,
  and the logits go back to the frame size the same way (bilinear). Every backend runs a MatMul fast
  (TensorRT/DLA included) and no Resize op needs its cubic mode. The output MatMuls keep their constant as the
  *first* input (``R @ x``, with transposes around the second one), so the quantisers' structural search for the
  model body (``calibration.backends.common.body_nodes``: weights are a constant *second* input) never mistakes
  them for the classifier.

A frame of the model size skips the resize either way.

``bare=True`` gives the plain model on normalised ``(B, 3, S, S)`` float input instead (for runtimes that
preprocess themselves); the Python runtime then does the same pre/post-processing in numpy.

``half=True`` runs the task model in float16 (weights and compute) while the pre/post-processing stay in
float32: the exported ONNX carries explicit ``Cast`` nodes, which is what a strongly typed TensorRT (11+)
build needs and what ORT/TensorRT 10 run as fp16.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from usfm_edge.core.bundle_schema import BundleMeta, InputContract, TensorSpec
from usfm_edge.core.errors import ExportError
from usfm_edge.core.preprocess import PreprocessSpec
from usfm_edge.models.resample import MatMulResize, resize_dense, resize_taps

__all__ = ["PreprocessGraph", "RawFrameModel", "output_names", "binary_seg_post", "channel_softmax", "RESAMPLE",
           "NO_BAND_STOP"]

#: how a graph resizes (module docstring): ``resize_taps`` everywhere, or MatMuls / ONNX ``Resize`` where they pay
RESAMPLE = ("gather", "matmul")

#: the ``band_stop`` record of a graph without band-stop filtering
NO_BAND_STOP = {"enabled": False, "rings": None, "mask_sha256": None}

_OUTPUTS = {
    (False, "seg"): ("probs", "mask"),
    (False, "cls"): ("probs",),
    (False, "enhance"): ("restored",),
    (False, "features"): ("features",),
    (True, "seg"): ("logits",),
    (True, "cls"): ("logits",),
    (True, "enhance"): ("restored",),
    (True, "features"): ("features",),
}


def output_names(task: str, bare: bool = False) -> tuple[str, ...]:
    """Graph output names of a task (raw-frame or bare graph)."""
    try:
        return _OUTPUTS[(bool(bare), task)]
    except KeyError:
        raise ExportError(f"unknown task {task!r}; expected features, seg, cls or enhance") from None


def channel_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 1 of ``(B, K, H, W)`` written as ReduceMax / Exp / ReduceSum / Div.

    The same values as ``torch.softmax(x, 1)`` (to float rounding), but ONNX Runtime 1.32's ``Softmax`` on a
    non-last axis transposes the frame-size maps to put the axis last and back: on a 540x800 frame with two
    classes the post-processing (bilinear resize, softmax, argmax) took 33.9 ms with the op and 8.5 ms written out
    on an AVX2 CPU; OpenVINO 5.9 and 6.4 ms (benchmarks/bench_resize_ops.py, RESULTS.md §4.5).
    """
    e = torch.exp(x - torch.amax(x, dim=1, keepdim=True))
    return e / torch.sum(e, dim=1, keepdim=True)


def binary_seg_post(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class seg outputs from the logit difference ``d = l1 - l0`` ``(B, 1, H, W)`` at frame size.

    Returns ``probs = [1 - s, s]`` with ``s = sigmoid(d)`` ``(B, 2, H, W)`` and ``mask = s > 0.5`` (uint8): the
    softmax and argmax of the two resized logit maps, since ``softmax(l)_1 = sigmoid(l1 - l0)`` and a bilinear
    resize is linear (``resize(l1) - resize(l0) = resize(l1 - l0)``). The mask is the probabilities' argmax
    exactly (for ``s`` near 0.5, ``1 - s`` is exact in float, so ``s > 1 - s`` iff ``s > 0.5``; ties go to class
    0, as ``argmax``). The graph resizes one map instead of two, needs no reductions at frame size and takes one
    ``Sigmoid`` over one map (``sigmoid([-d, d])`` took two, plus a negation: 0.84 of 1.51 ms of an HC18 student
    bundle's post-processing on a 540x800 frame, OpenVINO counters). ``RawFrameModel`` takes this path for every
    2-class model. Background probabilities below float32's resolution near 1 (``d`` > ~17) come out as 0.
    """
    s = torch.sigmoid(d)
    return torch.cat([1.0 - s, s], dim=1), (s[:, 0] > 0.5).to(torch.uint8)


class PreprocessGraph(nn.Module):
    """uint8 frames ``(B, H, W)`` -> normalised model input ``(B, C, S, S)`` float32 (traceable).

    Args:
        spec: the preprocessing contract (size, interpolation, mean/std, channels).
        band_stop_mask: optional real ``(S, S)`` mask (unshifted layout) applied with
            ``kernels.dft_matmul.BandStopMatMul`` to the [0, 1] image before normalisation.
        static_hw: the fixed frame ``(H, W)`` of a static-shape graph (none at all when it is the model size);
            None: any frame size.
        resample: ``matmul``: ``MatMulResize`` for a static frame, ``resize_dense`` for any size; ``gather``:
            ``resize_taps`` for both.
    """

    def __init__(self, spec: PreprocessSpec, band_stop_mask: np.ndarray | None = None,
                 static_hw: tuple[int, int] | None = None, resample: str = "matmul"):
        super().__init__()
        if resample not in RESAMPLE:
            raise ExportError(f"resample must be one of {RESAMPLE}, not {resample!r}")
        if spec.antialias:
            raise ExportError("antialiased resizing cannot be expressed in the exported graph (ONNX opset 17 / "
                              "TensorRT Resize have no antialias)", hint="export with antialias=False or bare=True")
        self.spec = spec
        self.size = int(spec.img_size)
        self.mode = spec.interpolation
        self.static_hw = tuple(int(v) for v in static_hw) if static_hw else None
        # the frame's resize: none for a frame of the model size, a static frame's constant MatMuls (resample
        # "matmul"), else taps built in the graph (resize_taps, or resize_dense for "matmul" on any size)
        self.resize = None
        if self.static_hw != (self.size, self.size):
            if self.static_hw is not None and resample == "matmul":
                self.resize = MatMulResize(self.static_hw, (self.size, self.size), self.mode)
            else:
                taps = resize_taps if resample == "gather" else resize_dense
                self.resize = functools.partial(taps, out_hw=(self.size, self.size), mode=self.mode)
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))
        self.band_stop = None
        if band_stop_mask is not None:
            from usfm_edge.kernels.dft_matmul import BandStopMatMul

            mask = np.asarray(band_stop_mask, dtype=np.float64)
            if mask.shape != (self.size, self.size):
                raise ExportError(f"band-stop mask is {mask.shape}, expected ({self.size}, {self.size})")
            self.band_stop = BandStopMatMul(mask)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.to(torch.float32).unsqueeze(1)  # (B, 1, H, W); the Cast is the first node on the uint8 input
        if self.static_hw is not None and tuple(x.shape[-2:]) != self.static_hw:
            raise ExportError(f"this graph takes {self.static_hw[0]}x{self.static_hw[1]} frames, got "
                              f"{x.shape[-2]}x{x.shape[-1]}", hint="fit the frame (runtime.Engine does)")
        if self.resize is not None:
            x = self.resize(x)
        x = x * (1.0 / 255.0)
        if self.band_stop is not None:
            x = self.band_stop(x)
        x = x.expand(-1, self.mean.shape[1], -1, -1)
        return (x - self.mean) * self.inv_std


class RawFrameModel(nn.Module):
    """Task model with pre- and post-processing inside the graph (see the module docstring).

    Args:
        task_model: a ``TaskModel`` (``task`` attribute; ``forward`` on normalised ``(B, 3, S, S)``).
        spec: preprocessing contract; its ``img_size`` must equal the model's input size.
        band_stop_mask: optional ``(S, S)`` band-stop mask applied in the graph.
        bare: export the plain model on normalised input (no pre/post-processing).
        half: run the task model in float16 (pre/post-processing stay float32).
        static_hw: the fixed frame ``(H, W)`` of a static-shape graph: constant MatMuls or constant taps, as
            ``resample`` says (module docstring).
        resample: ``gather`` or ``matmul``, how the graph resizes (module docstring): OpenVINO runs
            ``resize_taps``' Gathers faster than its ``Interpolate`` or MatMuls (an HC18 student bundle 1.7x faster
            as a whole, benchmarks/RESULTS.md §4.5); ONNX Runtime runs its own bilinear ``Resize`` faster than
            Gathers. Same values either way.

    Shape:
        raw: input ``(B, H, W)`` uint8; outputs per ``output_names(task)``.
        bare: input ``(B, 3, S, S)`` float32; outputs per ``output_names(task, bare=True)``.
    """

    def __init__(self, task_model: nn.Module, spec: PreprocessSpec, band_stop_mask: np.ndarray | None = None,
                 bare: bool = False, half: bool = False, static_hw: tuple[int, int] | None = None,
                 resample: str = "matmul"):
        super().__init__()
        self.task = getattr(task_model, "task", None)
        output_names(self.task, bare)  # validates the task
        model_size = getattr(task_model, "img_size", spec.img_size)
        model_size = model_size[0] if isinstance(model_size, (tuple, list)) else model_size
        if int(model_size) != int(spec.img_size):
            raise ExportError(f"preprocessing img_size {spec.img_size} != model input size {model_size}")
        self.spec = spec
        self.bare = bool(bare)
        self.half = bool(half)
        self.model = task_model.eval()
        if self.half:
            self.model = self.model.half()
        self.static_hw = None if self.bare or not static_hw else tuple(int(v) for v in static_hw)
        self.pre = None if self.bare else PreprocessGraph(spec, band_stop_mask, self.static_hw, resample)
        self.resample = resample
        s = int(spec.img_size)
        self.post_resize = MatMulResize((s, s), self.static_hw, "bilinear") \
            if self.static_hw not in (None, (s, s)) and self.task in ("seg", "enhance") and resample == "matmul" \
            else None
        self.output_names = output_names(self.task, self.bare)
        self.eval()  # an nn.Module starts in training mode; exporters restore that mode on every child

    def train(self, mode: bool = True) -> RawFrameModel:
        """Always eval: the wrapper is a deployment graph (dropout off, BatchNorm running stats frozen)."""
        return super().train(False)

    @property
    def input_name(self) -> str:
        return "x" if self.bare else "frame"

    def _model(self, x: torch.Tensor) -> torch.Tensor:
        if self.half:
            return self.model(x.half()).float()
        return self.model(x)

    def forward(self, inp: torch.Tensor):
        if self.bare:
            return self._model(inp)
        frames = inp
        x = self.pre(frames)
        out = self._model(x)
        if self.task == "features":
            return out
        if self.task == "cls":
            return torch.softmax(out, dim=-1)
        h, w = frames.shape[-2], frames.shape[-1]
        if self.task == "seg":
            if out.shape[1] == 2:
                return binary_seg_post(self._to_frame(out[:, 1:2] - out[:, 0:1], h, w))
            logits = self._to_frame(out, h, w)
            probs = channel_softmax(logits)
            mask = torch.argmax(logits, dim=1).to(torch.uint8)
            return probs, mask
        # enhance: restored grey in [0, 1] at model size -> uint8 at frame size
        img = self._to_frame(out, h, w)
        img = torch.round(torch.clamp(img, 0.0, 1.0) * 255.0)
        return img[:, 0].to(torch.uint8)

    def _to_frame(self, out: torch.Tensor, h, w) -> torch.Tensor:
        """Model-size maps -> frame size, bilinear, as ``resample`` says (module docstring)."""
        s = int(self.spec.img_size)
        if self.static_hw == (s, s):
            return out
        if self.static_hw is not None:
            h, w = self.static_hw
        if self.post_resize is not None:
            return self.post_resize(out)
        if self.resample == "gather":
            return resize_taps(out, (h, w), "bilinear")
        return F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)

    # -- description of the graph's interface (usfm.json + dynamic axes) -------------------------------
    def example_input(self, batch: int = 1, hw: tuple[int, int] | None = None) -> torch.Tensor:
        """A deterministic example input for tracing (uint8 frames, or normalised zeros when bare)."""
        s = int(self.spec.img_size)
        if self.bare:
            return torch.zeros(batch, self.spec.in_chans, s, s)
        h, w = hw or (s + 37, s + 53)  # not the model size: the traced resize must stay a real resize
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (batch, h, w), dtype=torch.uint8, generator=g)

    def dynamic_axes(self, dynamic_batch: bool, dynamic_hw: bool) -> dict[str, dict[int, str]]:
        """``torch.onnx.export`` dynamic axes for this graph's input and outputs."""
        axes: dict[str, dict[int, str]] = {}
        b = {0: "batch"} if dynamic_batch else {}
        hw_in = {1: "height", 2: "width"} if (dynamic_hw and not self.bare) else {}
        axes[self.input_name] = {**b, **hw_in}
        for name in self.output_names:
            ax = dict(b)
            if dynamic_hw and not self.bare and (name == "mask" or name == "restored"):
                ax.update({1: "height", 2: "width"})
            if dynamic_hw and not self.bare and name == "probs" and self.task == "seg":
                ax.update({2: "height", 3: "width"})
            axes[name] = ax
        return {k: v for k, v in axes.items() if v}

    def contract(self, *, precision: str = "fp32", backend: str = "torch", target: str = "pytorch",
                 dynamic_batch: bool = True, dynamic_hw: bool = True, static_hw: tuple[int, int] | None = None,
                 band_stop: dict | None = None) -> BundleMeta:
        """This graph's model contract (a ``BundleMeta`` without files): inputs, outputs, labels, preprocessing,
        precision. The exporter completes it into ``usfm.json`` and writes it into the ONNX metadata;
        ``evaluation.TorchPredictor`` runs the graph under it.

        Args:
            precision, backend, target: as recorded in the bundle.
            dynamic_batch, dynamic_hw: the graph accepts any batch / any frame size.
            static_hw: the fixed frame ``(H, W)`` of a static-shape raw-frame graph.
            band_stop: the band-stop record (``{"enabled", "rings", "mask_sha256"}``).
        """
        m = self.model
        labels = [str(x) for x in (getattr(m, "labels", None) or [])]
        k = int(getattr(m, "num_classes", 0) or len(labels))
        batch: int | str = "batch" if dynamic_batch else 1
        hw = tuple(static_hw) if static_hw else ("height", "width")
        inp, outs = self._tensor_specs(k, getattr(getattr(m, "backbone", None), "embed_dim", None), batch, hw)
        axes = (["batch"] if dynamic_batch else []) + (["height", "width"] if dynamic_hw and not self.bare else [])
        contract = InputContract(tensor=inp, layout="BCHW" if self.bare else "BHW", raw_frame=not self.bare,
                                 dynamic_axes=axes, min_side=8, max_side=int(self.spec.max_side),
                                 static_hw=[int(v) for v in static_hw] if static_hw else None,
                                 max_batch=None if dynamic_batch else 1)
        return BundleMeta(task=self.task, labels=labels, input=contract, outputs=outs,
                          preprocessing=self.spec.to_dict(), band_stop=dict(band_stop or NO_BAND_STOP),
                          precision=precision, backend=backend, target=target, files={})

    def _tensor_specs(self, k: int, embed_dim: int | None, batch: int | str,
                      hw: tuple[int | str, int | str]) -> tuple[TensorSpec, list[TensorSpec]]:
        """Input and output ``TensorSpec`` of the graph: K classes, feature width D, fixed or named batch/size."""
        s, (h, w) = int(self.spec.img_size), hw
        if self.bare:
            inp = TensorSpec("x", "float32", [batch, self.spec.in_chans, s, s], "normalised model input")
            shapes = {
                "seg": [TensorSpec("logits", "float32", [batch, k, s, s], "class logits at model size")],
                "cls": [TensorSpec("logits", "float32", [batch, k], "class logits")],
                "enhance": [TensorSpec("restored", "float32", [batch, 1, s, s],
                                       "restored grey in [0, 1] at model size")],
            }
        else:
            inp = TensorSpec("frame", "uint8", [batch, h, w], "raw grey B-mode frame(s), 0..255")
            shapes = {
                "seg": [TensorSpec("probs", "float32", [batch, k, h, w], "softmax over classes at frame size"),
                        TensorSpec("mask", "uint8", [batch, h, w], "argmax class per pixel at frame size")],
                "cls": [TensorSpec("probs", "float32", [batch, k], "softmax over classes")],
                "enhance": [TensorSpec("restored", "uint8", [batch, h, w], "restored grey frame at frame size")],
            }
        shapes["features"] = [TensorSpec("features", "float32", [batch, int(embed_dim or 0)], "pooled embedding")]
        return inp, shapes[self.task]
