"""One evaluation path for PyTorch checkpoints and exported bundles (see ``evaluate.py``).

``TorchPredictor`` (``torch_predictor.py``) is resolved lazily: importing this package never imports torch.
"""

from usfm_edge.evaluation.evaluate import PRIMARY, evaluate, evaluate_predictor, open_predictor
from usfm_edge.evaluation.records import describe_selection, read_frame, read_mask, select_records

__all__ = ["evaluate", "evaluate_predictor", "select_records", "describe_selection", "read_frame", "read_mask",
           "open_predictor", "PRIMARY", "TorchPredictor"]


def __getattr__(name: str):
    if name == "TorchPredictor":
        from usfm_edge.evaluation.torch_predictor import TorchPredictor

        return TorchPredictor
    raise AttributeError(f"module 'usfm_edge.evaluation' has no attribute {name!r}")
