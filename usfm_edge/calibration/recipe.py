"""``QuantRecipe``: one description of how to quantise a USFM ViT, translated for each backend.

The transformer preset (``QuantRecipe()``) and why (reference/perf-baseline.md §1-2, §5; edge-anchors.md §4, §7):

* **Only MatMul/Gemm/Conv are quantised** (their inputs; outputs stay float). ORT's default op list also wraps
  Add/Softmax/GELU/LayerNorm in Q/DQ and destroys a ViT (centred cosine 0.14); MatMul/Gemm/Conv only keeps
  it (0.85+ on random weights) and is faster. LayerNorm, Softmax, GELU (Erf), residual Adds, the in-graph
  pre-processing (resize, band-stop DFT MatMuls, normalisation) and post-processing (resize, softmax,
  argmax) stay float. NNCF gets the same through ``ModelType.TRANSFORMER`` (which ignores MVN/Add/...)
  plus an ignored scope covering everything outside the model body.
* **The last layer (the task classifier) stays float** (NNCF/ModelOpt ViT practice: the head is small and
  its errors go straight to the output).
* **The task head stays float** (``float_scopes``: every node whose name starts with ``/model/head/`` or
  ``/model/aux_head/``, i.e. the seg/enhance decoder and UperNet's auxiliary FCN head; the cls head is the last
  layer anyway), **except the hires head** (``for_head("hires")``): its conv stem and U-Net decoder run at strides
  2-8 and dominate the model's time, so they are quantised, with the classifier float and the gate deciding. The INT8 time is in the ViT body's MatMuls; the decoder is small next to it at these sizes and
  sensitive: on a UperNet seg model trained for 20 steps, quantising its PPM/FPN convs gave mask Dice 0.50
  against fp32 (parity fails, ``onnx`` and ``jetson``), float head: parity passes, centred cosine 1.00.
* **Only quantised ops read quantised tensors.** ORT's QDQ quantiser puts one Q/DQ pair on an activation and
  hands its DequantizeLinear output to *every* consumer, so a tensor feeding both a quantised Conv/MatMul and
  a Concat/Resize (UperNet's PPM input, its FPN levels) had the float ops compute on rounded values, and
  ``check_qdq`` refused the graph ("a quantised tensor feeds '/model/head/Concat_8' (Concat)").
  ``DedicatedQDQPair`` does not cure it (a lone quantised consumer still shares its pair with the rest), so
  after quantisation ``common.float_path_for_unquantized`` gives every other consumer (Shape included) the
  original float tensor back: exactly the fp32 computation on the float path, Q/DQ only in front of
  MatMul/Gemm/Conv (TensorRT's rules: zero-point 0, standard ops, per-channel axes, are checked after it).
* **Per-channel symmetric int8 weights** (axis 0 for Conv, axis 1 = output channels for MatMul [in, out]).
* **Activations**: symmetric int8 (zero-point 0) for ``onnx`` (S8S8 QDQ is ORT's first choice and the only
  form its CUDA/TensorRT providers accept) and **required** for TensorRT; NNCF's ``MIXED`` preset
  (asymmetric activations, NNCF's transformer default) for OpenVINO.
* **SmoothQuant** on for NNCF with alpha 0.15 (NNCF's own ViT-B/16 conformance setting: 81.07 -> 80.95);
  off for ORT (its SmoothQuant needs intel-neural-compressor and a different graph form).
* **Global MinMax activation ranges** by default, on every backend, over EVERY calibration frame (ORT's
  ``CalibMaxIntermediateOutputs`` is never set: it silently drops all but the last frames, see
  ``ort_options``). NNCF's own default (the *mean* over frames of per-frame min/max, ``mean_minmax`` here)
  clips the tails: on the test model it dropped the held-out centred cosine from 0.99 to 0.81; re-measured in
  session 3 with ORT fixed (light-head test model, gate frames): centred cosine minmax 0.9994 / 1.0 (ORT /
  TensorRT Q/DQ) vs mean_minmax 0.998 / 0.998. ``percentile`` (ORT Percentile / NNCF MEAN_QUANTILE) and ``entropy``
  (ORT Entropy / NNCF HISTOGRAM) are selectable for sets with rare saturated frames.
* **Nothing but MatMul/Convolution inputs in NNCF either**: NNCF would also quantise Interpolate inputs (the
  seg head's feature upsampling), which cost another 0.2 of centred cosine on the test model.
* **Accuracy**: the gate (``gate.py``) refuses a task-metric drop above ``max_drop`` (default per task:
  Dice/AUC 0.01 absolute, PSNR 0.5 dB) or a mean centred cosine below ``min_centred_cosine``; on OpenVINO a
  failed gate first retries with NNCF accuracy control (reverts the most harmful layers to float). For
  fetal-head models scored on HC18 frames, ``max_hc_increase_mm`` (``--max-hc-increase``) also bounds the rise
  of the mean absolute head-circumference error; the rise is reported either way.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from usfm_edge.core.errors import ConfigError

__all__ = ["QuantRecipe", "RECIPES", "get_recipe", "DEFAULT_MAX_DROP", "INT8_PARITY"]

#: task -> largest allowed drop of the primary metric (absolute; PSNR in dB).
DEFAULT_MAX_DROP = {"seg": 0.01, "cls": 0.01, "enhance": 0.5, "features": None}
#: parity thresholds recorded in INT8 bundles: the exporter's check against PyTorch fp32 on its verification
#: frames (worst frame): raw cosine of every float output >= 0.95 and seg mask Dice (mean over the classes
#: present) >= 0.90. It proves the bundle is the gated model and was converted right; the held-out accuracy
#: gate (task metric + centred cosine) is the acceptance test. Measured on the test model: cosine >= 0.9999,
#: mask Dice 0.99 (ORT Q/DQ, NNCF), 0.997 (TensorRT Q/DQ in ORT); a broken calibration gives mask Dice ~0.6.
INT8_PARITY = {"cosine": 0.95, "dice": 0.90}
_METHODS = ("minmax", "mean_minmax", "percentile", "entropy")
_ACCURACY_CONTROL = ("auto", "always", "never")


@dataclass(frozen=True)
class QuantRecipe:
    """How to quantise (see the module docstring for the defaults and their reasons).

    Attributes:
        name: preset name.
        quantize_op_types: ONNX op types whose inputs are quantised.
        float_op_types: op types that must never consume a quantised tensor (checked on Q/DQ output).
        keep_last_layer_float: leave the last MatMul/Gemm/Conv (the task classifier) in float.
        float_scopes: node-name prefixes never quantised (the task head and UperNet's auxiliary head).
        per_channel: per-output-channel weight scales.
        symmetric_weights: zero-point 0 for weights.
        symmetric_activations: zero-point 0 for activations; None = per backend (onnx/tensorrt yes, openvino no).
        quantize_outputs: also quantise the outputs of quantised ops (off: TensorRT/NNCF style, less error).
        reduce_range: 7-bit weights (old AVX2 U8S8 saturation workaround; off by default).
        calibration_method: ``minmax`` (global), ``mean_minmax`` (mean of per-frame min/max, NNCF's default),
            ``percentile`` or ``entropy``.
        percentile: upper percentile for ``percentile`` calibration.
        smooth_quant: apply SmoothQuant (NNCF only).
        smooth_quant_alpha: SmoothQuant alpha for MatMuls.
        fast_bias_correction: NNCF's fast bias correction.
        max_drop: largest allowed drop of the task metric; None = ``DEFAULT_MAX_DROP[task]``.
        min_centred_cosine: smallest allowed mean centred cosine (int8 vs fp32) of the main output.
        max_hc_increase_mm: for fetal-head models scored on records with a reference head circumference (HC18):
            largest allowed increase of the mean absolute HC error, in mm (None = report only).
        ort_cpu_convs: also quantise convolutions for the ONNX Runtime CPU target (off: on ORT's CPU kernels the
            Q/DQ pairs around a conv head cost more than the int8 convolutions save, RESULTS.md §4.1; TensorRT and
            OpenVINO keep them).
        accuracy_control: NNCF accuracy control: ``auto`` (retry with it when the gate fails and held-out
            frames with labels exist), ``always`` or ``never``.
        gate_frames: most held-out frames the gate evaluates.
        sensitivity_top_k: layers listed in the sensitivity report.
        parity: thresholds for the exporter's parity check of INT8 bundles (vs PyTorch fp32).
    """

    name: str = "transformer"
    quantize_op_types: tuple[str, ...] = ("MatMul", "Gemm", "Conv")
    float_op_types: tuple[str, ...] = ("LayerNormalization", "Softmax", "Erf", "Gelu", "Add", "Sub", "Div",
                                       "Pow", "Sqrt", "ReduceMean", "Resize", "ArgMax", "Sigmoid", "Tanh")
    keep_last_layer_float: bool = True
    float_scopes: tuple[str, ...] = ("/model/head/", "/model/aux_head/")
    per_channel: bool = True
    symmetric_weights: bool = True
    symmetric_activations: bool | None = None
    quantize_outputs: bool = False
    reduce_range: bool = False
    calibration_method: str = "minmax"
    percentile: float = 99.999
    smooth_quant: bool = True
    smooth_quant_alpha: float = 0.15
    fast_bias_correction: bool = True
    max_drop: float | None = None
    min_centred_cosine: float = 0.80
    max_hc_increase_mm: float | None = None
    ort_cpu_convs: bool = False
    accuracy_control: str = "auto"
    gate_frames: int = 48
    sensitivity_top_k: int = 5
    parity: dict = field(default_factory=lambda: dict(INT8_PARITY))

    def __post_init__(self):
        if self.calibration_method not in _METHODS:
            raise ConfigError(f"calibration_method must be one of {', '.join(_METHODS)}, "
                              f"got {self.calibration_method!r}")
        if self.accuracy_control not in _ACCURACY_CONTROL:
            raise ConfigError(f"accuracy_control must be one of {', '.join(_ACCURACY_CONTROL)}")
        bad = set(self.quantize_op_types) - {"MatMul", "Gemm", "Conv"}
        if bad:
            raise ConfigError(f"only MatMul, Gemm and Conv may be quantised in a ViT, not {sorted(bad)} "
                              "(quantising Add/Softmax/LayerNorm destroys it: perf-baseline §5)")

    def for_head(self, head: str | None, task: str | None = None) -> QuantRecipe:
        """The recipe adapted to the model's head (``BundleMeta.model["head"]``) and task.

        A ``features`` bundle has no classifier: its last MatMul is the last block's MLP projection, as
        robust as the other eleven, so ``keep_last_layer_float`` does not apply (kept float it cost 2.1 ms of
        a 42.9 ms ViT-B INT8 bundle, RESULTS.md §4.3).

        The ``hires`` head is a convolutional U-Net decoder with a conv stem at strides 2-8 and the ``hybrid``
        head a full conv U-Net, most of the model's time at high resolution: its convolutions are quantised too (the classifier stays float through
        ``keep_last_layer_float``); the accuracy gate judges the result. Other heads keep the default scopes.
        """
        recipe = self.replace(keep_last_layer_float=False) if task == "features" else self
        if head in ("hires", "hybrid") and recipe.float_scopes == QuantRecipe.float_scopes:
            return recipe.replace(float_scopes=("/model/aux_head/", "/model/head/cls_aux"))
        return recipe

    def for_backend(self, backend: str) -> QuantRecipe:
        """The recipe for one backend: on ONNX Runtime's CPU target the convolutions stay float unless
        ``ort_cpu_convs`` (MatMul/Gemm only, as a by-hand ``quantize_static`` restricted to them)."""
        if backend == "onnxruntime" and not self.ort_cpu_convs and "Conv" in self.quantize_op_types:
            return self.replace(quantize_op_types=tuple(t for t in self.quantize_op_types if t != "Conv"))
        return self

    def in_float_scope(self, name: str) -> bool:
        """True when a node (ONNX node / OpenVINO friendly name) lies under one of ``float_scopes``."""
        return any(name.startswith(p) for p in self.float_scopes)

    def replace(self, **changes) -> QuantRecipe:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def max_drop_for(self, task: str) -> float | None:
        """The allowed primary-metric drop for a task (``max_drop`` or the task default)."""
        return self.max_drop if self.max_drop is not None else DEFAULT_MAX_DROP.get(task)

    def activations_symmetric(self, backend: str) -> bool:
        """Resolved activation symmetry: TensorRT requires it, ORT uses S8S8, NNCF MIXED does not."""
        if backend == "tensorrt":
            return True
        if self.symmetric_activations is not None:
            return bool(self.symmetric_activations)
        return backend == "onnxruntime"

    # -- translations ------------------------------------------------------------------------------
    def ort_options(self, backend: str = "onnxruntime") -> dict:
        """Keyword arguments for ``onnxruntime.quantization.quantize_static`` (minus model, reader, nodes).

        ``backend="tensorrt"`` forces what TensorRT 10.3/11 explicit quantisation needs: int8 activations and
        weights with zero-point 0, float bias (TensorRT has no INT32 DequantizeLinear), inputs-only Q/DQ.
        """
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

        trt = backend == "tensorrt"
        sym_act = self.activations_symmetric(backend)
        method = {"minmax": CalibrationMethod.MinMax, "mean_minmax": CalibrationMethod.MinMax,
                  "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}[
            self.calibration_method]
        extra = {"ActivationSymmetric": sym_act, "WeightSymmetric": True if trt else self.symmetric_weights,
                 "QuantizeBias": False, "DedicatedQDQPair": False}
        if not self.quantize_outputs or trt:
            extra["OpTypesToExcludeOutputQuantization"] = list(self.quantize_op_types)
        if self.calibration_method == "percentile":
            extra["CalibPercentile"] = float(self.percentile)
        if self.calibration_method == "mean_minmax":
            extra["CalibMovingAverage"] = True
        # Never set CalibMaxIntermediateOutputs: ORT (<= 1.32 at least) empties its buffer every N frames
        # WITHOUT merging the ranges (microsoft/onnxruntime PR #20226 was closed unmerged), so only the last
        # len(frames) % N frames would calibrate, and none when N divides the count ("No data is collected").
        # MinMax keeps only per-frame Reduce{Min,Max} results, so holding every frame costs little memory.
        return {"quant_format": QuantFormat.QDQ, "op_types_to_quantize": list(self.quantize_op_types),
                "per_channel": self.per_channel, "reduce_range": self.reduce_range and not trt,
                "activation_type": QuantType.QInt8 if (sym_act or trt) else QuantType.QUInt8,
                "weight_type": QuantType.QInt8, "calibrate_method": method, "extra_options": extra}

    def nncf_options(self) -> dict:
        """Keyword arguments for ``nncf.quantize`` (minus model, dataset, subset size and ignored scope)."""
        import nncf
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

        sym = self.activations_symmetric("openvino")
        preset = nncf.QuantizationPreset.PERFORMANCE if sym else nncf.QuantizationPreset.MIXED
        alphas = AdvancedSmoothQuantParameters(matmul=float(self.smooth_quant_alpha) if self.smooth_quant else -1.0)
        from nncf.quantization.range_estimator import RangeEstimatorParametersSet as Ranges

        ranges = {"minmax": Ranges.MINMAX, "mean_minmax": Ranges.MEAN_MINMAX, "percentile": Ranges.MEAN_QUANTILE,
                  "entropy": Ranges.HISTOGRAM}[self.calibration_method]
        adv = AdvancedQuantizationParameters(smooth_quant_alphas=alphas, activations_range_estimator_params=ranges)
        return {"model_type": nncf.ModelType.TRANSFORMER, "preset": preset,
                "fast_bias_correction": self.fast_bias_correction, "advanced_parameters": adv}


RECIPES: dict[str, QuantRecipe] = {
    "transformer": QuantRecipe(),
    # accuracy first: percentile ranges, attention kept as NNCF decides, accuracy control always on OpenVINO
    "transformer-accurate": QuantRecipe(name="transformer-accurate", calibration_method="percentile",
                                        accuracy_control="always"),
    # SmoothQuant off (NNCF; ORT never uses it): on the 4-block test model (random weights, 16 real calibration
    # frames) held-out centred cosine 0.9930 off vs 0.9935 on: a switch to compare on trained weights, not tuned
    "transformer-no-smoothquant": QuantRecipe(name="transformer-no-smoothquant", smooth_quant=False),
    # MatMul/Gemm only, every convolution float on every backend (the ONNX Runtime CPU target does this by
    # default: there the Q/DQ pairs around the hybrid head's convs cost more than int8 convs save, RESULTS.md §4.1)
    "transformer-matmul": QuantRecipe(name="transformer-matmul", quantize_op_types=("MatMul", "Gemm")),
    # the convolutions quantised on the ONNX Runtime CPU target too
    "transformer-ort-convs": QuantRecipe(name="transformer-ort-convs", ort_cpu_convs=True),
}


def get_recipe(name: str | QuantRecipe | None) -> QuantRecipe:
    """A recipe by preset name (None = ``transformer``)."""
    if isinstance(name, QuantRecipe):
        return name
    key = name or "transformer"
    if key not in RECIPES:
        raise ConfigError(f"unknown quantisation recipe {key!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[key]
