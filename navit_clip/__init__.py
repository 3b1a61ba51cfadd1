"""navit_clip: native-resolution contrastive image-text pretraining in JAX (layers: README)."""

__version__ = "0.1.0"
