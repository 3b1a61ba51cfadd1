"""navit_clip.data (folder data/): host-side data, no JAX: sources -> preprocess -> pack -> batch."""
