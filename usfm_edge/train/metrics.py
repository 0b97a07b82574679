"""Re-export of ``usfm_edge.core.metrics`` (numpy-only task metrics, shared with the torch-free runtime)."""

from usfm_edge.core.metrics import *  # noqa: F401,F403
