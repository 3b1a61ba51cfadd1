"""navit-clip: native-resolution contrastive image-text pretraining in JAX."""

__version__ = "0.1.0"
