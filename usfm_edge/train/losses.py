"""Re-export of ``usfm_edge.models.losses`` (the pretraining losses live beside the model that owns them)."""

from usfm_edge.models.losses import *  # noqa: F401,F403
from usfm_edge.models.losses import FOURIER_LOSSES, fourier_loss, masked_l1  # noqa: F401
