"""farm: a training-farm orchestrator for hyperscale transformer pre-training."""

__version__ = "0.1.0"
