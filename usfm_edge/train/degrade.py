"""Re-export of ``usfm_edge.data.degrade`` (numpy ultrasound degradation, used by training and evaluation)."""

from usfm_edge.data.degrade import *  # noqa: F401,F403
from usfm_edge.data.degrade import DegradeConfig, degrade, gaussian_blur  # noqa: F401
