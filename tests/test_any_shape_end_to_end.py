"""Any resolution and aspect ratio goes image -> resolution -> patchify -> pack -> tower,
with device shapes that never change from batch to batch (one compile)."""

import jax
import numpy as np
from flax import nnx

from data_fixtures import validate_batch
from navit_clip.data.batch import BatchSpec
from navit_clip.data.pack import pack
from navit_clip.data.patchify import patchify, resize
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.image_tower import ImageTower

PATCH, SEQ_LEN, MAX_IMAGES = 4, 32, 6
# (height, width): a single pixel, 1:20 strips both ways, 1:100, tiny, huge, and ordinary.
NATIVE_SIZES = [(1, 1), (1, 20), (20, 1), (5, 100), (100, 5), (3, 7), (2, 300), (400, 4),
                (64, 48), (48, 64), (1000, 50), (33, 33), (7, 140), (250, 250)]


def _examples(kind: str):
  sampler = ResolutionSampler(kind, PATCH, SEQ_LEN, min_side=4, max_side=40, patch_budget=20,
                              max_upscale=8.0)
  rng = np.random.default_rng(0)
  for i, (h, w) in enumerate(NATIVE_SIZES):
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    patches, positions, grid = patchify(resize(image, sampler(rng, h, w)), PATCH)
    yield {"patches": patches, "positions": positions, "grid_hw": grid,
           "example_id": np.int64(i)}


def test_every_shape_packs_and_embeds_with_one_compile():
  spec = BatchSpec(batch_size=2, seq_len=SEQ_LEN, max_images=MAX_IMAGES, patch_size=PATCH)
  tower = ImageTower(variant="mu/4", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(tower)
  traces = []

  @jax.jit
  def embed(state, batch):
    traces.append(1)  # runs once per trace, i.e. once per compile
    return nnx.merge(graphdef, state)(batch)

  seen = []
  for kind in ("uniform_side", "patch_budget", "truncnorm_side"):
    for batch in pack(_examples(kind), spec, "window_best_fit", window=8):
      validate_batch(batch, spec)
      device = {k: v for k, v in batch.items() if k != "example_id"}
      emb, mask = embed(state, device)
      emb = np.asarray(emb)
      assert np.isfinite(emb).all()
      assert (np.linalg.norm(emb[mask], axis=-1) > 0).all()
      assert (emb[~np.asarray(mask)] == 0).all()
      seen += batch["example_id"][batch["image_mask"]].tolist()
  assert len(traces) == 1
  assert sorted(seen) == sorted(list(range(len(NATIVE_SIZES))) * 3)
