"""hardmix: HardMix and its baselines as a drop-in PyTorch augmentation, plus one training run.

Nothing here imports Ray; the ``tune`` package (sweeps) is loaded lazily by the CLI.
"""

__version__ = "0.1.0"
