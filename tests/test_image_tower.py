"""The NaViT image tower: packing invariance, isolation, static shapes, scan/remat/bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from navit_clip.attention import AUTO
from navit_clip.config import default_config, validate
from navit_clip.image_tower import ImageTower, normalize_patches
from navit_clip.layers import Encoder, segment_mean

P, C = 4, 3
PATCH_DIM = P * P * C


def _image(rng: np.random.Generator, h: int, w: int) -> dict:
  """An h x w patch grid with random uint8 pixels [h*w, P*P*C]."""
  return {"hw": (h, w), "pixels": rng.integers(0, 256, (h * w, PATCH_DIM), np.uint8)}


def _pack(rows: list[list[dict]], length: int, max_images: int) -> dict:
  """Packs rows of images (in slot order) into a batch of the packed-batch contract."""
  b = len(rows)
  batch = {
      "patches": np.zeros((b, length, PATCH_DIM), np.uint8),
      "segment_ids": np.zeros((b, length), np.int32),
      "positions": np.zeros((b, length, 2), np.int32),
      "grid_hw": np.zeros((b, length, 2), np.int32),
      "image_mask": np.zeros((b, max_images), bool),
  }
  for r, images in enumerate(rows):
    start = 0
    for k, img in enumerate(images):
      h, w = img["hw"]
      end = start + h * w
      ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
      batch["patches"][r, start:end] = img["pixels"]
      batch["segment_ids"][r, start:end] = k + 1
      batch["positions"][r, start:end] = np.stack([ys.ravel(), xs.ravel()], -1)
      batch["grid_hw"][r, start:end] = (h, w)
      batch["image_mask"][r, k] = True
      start = end
  return {k: jnp.asarray(v) for k, v in batch.items()}


def _tower(seed=0, **kw) -> ImageTower:
  kw.setdefault("variant", "mu/4")
  return ImageTower(rngs=nnx.Rngs(seed), **kw)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return [_image(rng, h, w) for h, w in [(3, 4), (2, 5), (4, 4), (1, 3), (5, 2)]]


@pytest.mark.parametrize("pool", ["map", "mean"])
def test_packing_invariance(images, pool):
  """Image A embeds the same alone, at slot 0, 1 or 2, in row 0 or 1."""
  a, b, c, d, e = images
  tower = _tower(pool=pool)
  alone, _ = tower(_pack([[a]], 32, 4))
  packed, mask = tower(_pack([[b, a, d], [c, e, a]], 48, 4))
  shifted, _ = tower(_pack([[d, e], [a, c, b]], 48, 4))
  want = alone[0, 0]
  assert np.abs(want).max() > 1e-3
  for got in (packed[0, 1], packed[1, 2], shifted[1, 0]):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(mask, [[True, True, True, False], [True, True, True, False]])


def test_padding_and_empty_slots_change_nothing(images):
  a, b, c, _, _ = images
  tower = _tower()
  batch = _pack([[a, b], [c]], 40, 3)
  emb, _ = tower(batch)
  pad = (batch["segment_ids"] == 0)
  rng = np.random.default_rng(1)
  junk = dict(batch)
  junk["patches"] = jnp.where(pad[..., None], jnp.asarray(
      rng.integers(0, 256, batch["patches"].shape, np.uint8)), batch["patches"])
  junk["positions"] = jnp.where(pad[..., None], 7, batch["positions"])
  junk["grid_hw"] = jnp.where(pad[..., None], 3, batch["grid_hw"])
  emb_junk, _ = tower(junk)
  np.testing.assert_allclose(emb_junk, emb, atol=1e-6)
  assert np.isfinite(np.asarray(emb)).all()
  np.testing.assert_array_equal(emb[0, 2], 0.0)
  np.testing.assert_array_equal(emb[1, 1:], 0.0)


def test_all_padding_batch_is_finite_and_zero():
  tower = _tower()
  batch = _pack([[], []], 16, 2)
  emb, mask = tower(batch)
  assert not mask.any()
  np.testing.assert_array_equal(emb, 0.0)


def _embed_pixels(graphdef, state, pixels, batch):
  tower = nnx.merge(graphdef, state)
  tokens = tower.tokens(pixels, batch["segment_ids"], batch["positions"], batch["grid_hw"])
  return tower.pool(tokens, batch["segment_ids"], batch["image_mask"])


@pytest.mark.parametrize("pool", ["map", "mean"])
def test_no_gradient_between_images(images, pool):
  a, b, c, d, _ = images
  graphdef, state = nnx.split(_tower(pool=pool))
  batch = _pack([[b, a, d], [c]], 40, 4)
  pixels = normalize_patches(batch["patches"])
  emb, vjp = jax.vjp(lambda p, s: _embed_pixels(graphdef, s, p, batch), pixels, state)

  cot = jnp.zeros_like(emb).at[0, 1].set(1.0)  # image A: row 0, slot 1 (segment 2)
  grad_pixels, _ = vjp(cot)
  grad_norm = np.abs(np.asarray(grad_pixels)).sum(-1)
  mine = np.asarray(batch["segment_ids"]) == 2
  mine[1] = False
  assert (grad_norm[mine] > 0).all()
  np.testing.assert_array_equal(grad_norm[~mine], 0.0)

  empty = jnp.zeros_like(emb).at[0, 3].set(1.0).at[1, 1:].set(1.0)  # empty slots only
  grad_pixels, grad_state = vjp(empty)
  np.testing.assert_array_equal(grad_pixels, 0.0)
  for leaf in jax.tree.leaves(grad_state):
    np.testing.assert_array_equal(leaf, 0.0)


def _stack_into(scanned: Encoder, loop: Encoder) -> None:
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in loop.blocks])
  nnx.update(scanned.blocks, stacked)
  nnx.update(scanned.norm, nnx.state(loop.norm))


def _encoder(seed, **kw):
  return Encoder(32, 3, 64, 2, qk_norm=True, use_bias=False, dtype=jnp.float32,
                 backend="xla", rngs=nnx.Rngs(seed), **kw)


def _loss(model, x, seg):
  return (model(x, seg) ** 2).mean()


def _primitives(model, *args) -> str:
  graphdef, state = nnx.split(model)
  return str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(*args))(state))


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_encoder_matches_loop(remat):
  loop, scanned = _encoder(0), _encoder(1, scan_layers=True, remat=remat)
  kernels = np.asarray(scanned.blocks.mlp.fc1.kernel[...])
  assert kernels.shape[0] == 3 and not np.allclose(kernels[0], kernels[1])  # distinct layers
  _stack_into(scanned, loop)
  x = jax.random.normal(jax.random.key(0), (2, 12, 32))
  seg = jnp.asarray([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12], jnp.int32)
  np.testing.assert_allclose(scanned(x, seg), loop(x, seg), atol=1e-5)
  jaxpr = _primitives(scanned, x, seg)
  assert "scan[" in jaxpr and ("remat" in jaxpr) == (remat != "none")
  g_loop = nnx.grad(_loss, argnums=1)(loop, x, seg)
  g_scan = nnx.grad(_loss, argnums=1)(scanned, x, seg)
  np.testing.assert_allclose(g_scan, g_loop, atol=1e-6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_identical_outputs_and_grads(images, remat):
  a, b, c, _, _ = images
  batch = _pack([[a, b], [c]], 32, 2)
  plain, rematted = _tower(), _tower(remat=remat)

  def loss(model):
    emb, _ = model(batch)
    return (emb ** 2).sum()

  assert "remat" in _primitives(rematted, batch) and "remat" not in _primitives(plain, batch)
  np.testing.assert_array_equal(rematted(batch)[0], plain(batch)[0])
  grad = nnx.jit(nnx.grad(loss))
  g_plain, g_remat = grad(plain), grad(rematted)
  for want, got in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


def test_scanned_tower_trains(images):
  a, b, c, _, _ = images
  batch = _pack([[a, b], [c]], 32, 2)
  tower = _tower(scan_layers=True, remat="full")
  emb, _ = tower(batch)
  assert emb.shape == (2, 2, 32)
  grads = nnx.grad(lambda m: (m(batch)[0] ** 2).sum())(tower)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_segment_mean_averages_each_segment_in_float32():
  x = jnp.arange(12, dtype=jnp.bfloat16).reshape(1, 6, 2)
  segment_ids = jnp.asarray([[1, 1, 2, 0, 2, 2]], jnp.int32)  # position 3 is padding
  out = segment_mean(x, segment_ids, 3)
  assert out.dtype == jnp.float32 and out.shape == (1, 3, 2)
  np.testing.assert_allclose(out[0], [[1, 2], [22 / 3, 25 / 3], [0, 0]], rtol=1e-6)


def test_bfloat16_close_to_float32(images):
  a, b, c, _, _ = images
  batch = _pack([[a, b], [c]], 32, 2)
  want, _ = _tower()(batch)
  got, _ = _tower(dtype=jnp.bfloat16)(batch)  # same seed, same float32 params
  assert got.dtype == jnp.float32
  scale = np.abs(np.asarray(want)).max()
  np.testing.assert_allclose(got, want, atol=0.05 * scale)


@pytest.mark.parametrize("backend", ["splash", "pallas_gpu"])
def test_kernel_backend_matches_xla(images, backend):
  if jax.default_backend() != "cpu":
    pytest.skip("compared in interpret mode on CPU; tests/test_attention.py covers devices")
  a, b, c, d, e = images
  batch = _pack([[a, b, c, d, e], [e, a]], 128, 5)
  want, _ = _tower()(batch)
  got, _ = _tower(attention=backend)(batch)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_auto_attention_is_resolved_at_build():
  tower = _tower(attention="auto")
  assert tower.encoder.blocks[0].attn.backend == AUTO[jax.default_backend()]


def test_one_compile_for_different_layouts(images):
  a, b, c, d, e = images
  graphdef, state = nnx.split(_tower())
  traces = []

  @jax.jit
  def embed(state, batch):
    traces.append(1)
    return nnx.merge(graphdef, state)(batch)[0]

  first = embed(state, _pack([[a, b], [c, d]], 40, 3))
  second = embed(state, _pack([[e], [d, c, b]], 40, 3))
  assert len(traces) == 1
  assert first.shape == second.shape == (2, 3, 32)


def test_from_config():
  config = default_config()
  config.model.image.variant = "mu/4"
  config.model.image.pool = "mean"
  config.model.image.posemb = "sincos"
  validate(config)
  tower = ImageTower.from_config(config.model.image, rngs=nnx.Rngs(0))
  assert tower.patch_size == 4 and tower.head is None
  assert tower.posemb.kind == "sincos" and not jax.tree.leaves(nnx.state(tower.posemb))


def test_bad_inputs_are_named(images):
  tower = _tower()
  batch = _pack([[images[0]]], 16, 1)
  with pytest.raises(ValueError, match="uint8"):
    tower({**batch, "patches": batch["patches"].astype(jnp.float32)})
  with pytest.raises(ValueError, match=r"\[B, L, 48\]"):
    tower({**batch, "patches": batch["patches"][..., :12]})
  with pytest.raises(ValueError, match="image_mask"):
    tower({k: v for k, v in batch.items() if k != "image_mask"})
  with pytest.raises(ValueError, match="needs a patch size"):
    ImageTower(variant="mu", rngs=nnx.Rngs(0))
