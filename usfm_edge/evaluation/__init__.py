"""One evaluation path for PyTorch checkpoints and exported bundles (see ``evaluate.py``)."""

from usfm_edge.evaluation.evaluate import evaluate, evaluate_predictor, select_records

__all__ = ["evaluate", "evaluate_predictor", "select_records"]
