"""hardmix: HardMix and its baselines as a drop-in PyTorch augmentation, plus one training run.

Nothing here imports Ray; the ``tune`` package (sweeps) is loaded lazily by the CLI.
"""

__version__ = "0.1.0"

from hardmix.augment import METHODS, HardMix, MixOutput  # noqa: E402
from hardmix.loss import mixed_cross_entropy, mixed_target  # noqa: E402

__all__ = ["HardMix", "MixOutput", "METHODS", "mixed_cross_entropy", "mixed_target", "__version__"]
