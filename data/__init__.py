"""navit_clip.data: turning images and captions into packed batches.

Resolution sampling, patchify, token dropping and packing are plain NumPy and deterministic
for a seed; the Grain pipeline composes them. The packed-batch contract lives in `batch.py`.
"""
