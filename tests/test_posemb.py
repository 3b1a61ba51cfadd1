"""Position embeddings: factorized over fractional and absolute coordinates, and resized."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from navit_clip.posemb import FACTORIZED_KINDS, KINDS, position_embedding


def _grid(h: int, w: int):
  """positions, grid_hw int32 [1, h*w, 2] of an h x w patch grid in row-major order."""
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  pos = np.stack([ys.ravel(), xs.ravel()], -1)[None].astype(np.int32)
  return jnp.asarray(pos), jnp.full_like(pos, np.array([h, w], np.int32))


def _emb(kind, coords="fractional", resolution=16, width=16):
  return position_embedding(width, kind=kind, coords=coords, resolution=resolution,
                            rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_and_padding_is_finite(kind):
  pe = _emb(kind)
  pos, hw = _grid(3, 5)
  pos = jnp.concatenate([pos, jnp.zeros((1, 4, 2), jnp.int32)], axis=1)  # 4 padding tokens
  hw = jnp.concatenate([hw, jnp.zeros((1, 4, 2), jnp.int32)], axis=1)  # with grid (0, 0)
  out = pe(pos, hw)
  assert out.shape == (1, 19, 16) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kind", FACTORIZED_KINDS)
def test_fractional_same_at_corresponding_fractions(kind):
  """A 3x4 grid and its 2x enlargement (6x8) agree at (y, x) and (2y, 2x)."""
  pe = _emb(kind)
  small = pe(*_grid(3, 4))[0].reshape(3, 4, -1)
  large = pe(*_grid(6, 8))[0].reshape(6, 8, -1)
  np.testing.assert_array_equal(small, large[::2, ::2])
  assert not np.allclose(large[1, 1], large[0, 0])  # and the embedding is not constant


@pytest.mark.parametrize("kind", FACTORIZED_KINDS)
def test_fractional_hides_aspect_ratio(kind):
  """The centre of a 4x8 grid and of a 6x6 grid, r = (0.5, 0.5), embed the same."""
  pe = _emb(kind)
  a = pe(jnp.asarray([[[2, 4]]]), jnp.asarray([[[4, 8]]]))
  b = pe(jnp.asarray([[[3, 3]]]), jnp.asarray([[[6, 6]]]))
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", FACTORIZED_KINDS)
@pytest.mark.parametrize("coords", ["fractional", "absolute"])
def test_y_and_x_are_distinguished(kind, coords):
  pe = _emb(kind, coords)
  hw = jnp.asarray([[[8, 8], [8, 8]]])
  out = pe(jnp.asarray([[[1, 5], [5, 1]]]), hw)
  assert not np.allclose(out[0, 0], out[0, 1], atol=1e-4)


@pytest.mark.parametrize("kind", FACTORIZED_KINDS)
def test_absolute_depends_on_index_not_grid(kind):
  pe = _emb(kind, "absolute")
  a = pe(jnp.asarray([[[2, 3]]]), jnp.asarray([[[4, 8]]]))
  b = pe(jnp.asarray([[[2, 3]]]), jnp.asarray([[[9, 5]]]))
  np.testing.assert_array_equal(a, b)


def test_learned_buckets():
  pe = _emb("learned", resolution=10)
  pos = jnp.asarray([[[0, 0], [1, 2], [2, 6], [6, 6]]])
  hw = jnp.asarray([[[3, 7], [3, 7], [3, 7], [7, 7]]])
  want = np.floor(np.asarray(pos) / np.asarray(hw) * 10 + 1e-9).astype(np.int32)
  np.testing.assert_array_equal(pe.buckets(pos, hw), want)
  table_y, table_x = np.asarray(pe.table_y[...]), np.asarray(pe.table_x[...])
  np.testing.assert_allclose(pe(pos, hw)[0], table_y[want[0, :, 0]] + table_x[want[0, :, 1]])

  absolute = _emb("learned", "absolute", resolution=10)
  pos = jnp.asarray([[[3, 9], [12, 40]]])
  np.testing.assert_array_equal(absolute.buckets(pos, pos + 1), [[[3, 9], [9, 9]]])


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="'rope'"):
    _emb("rope")
  with pytest.raises(ValueError, match="'relative'"):
    _emb("learned", "relative")
  with pytest.raises(ValueError, match="divisible by 4"):
    _emb("sincos", width=18)
  with pytest.raises(ValueError, match=r"\[\.\.\., 2\]"):
    _emb("learned")(jnp.zeros((1, 3, 2), jnp.int32), jnp.zeros((1, 3), jnp.int32))


@pytest.mark.parametrize("hw", [(6, 6), (3, 10), (12, 4), (1, 1), (2, 17), (5, 6)])
def test_learned_2d_resizes_the_table_to_each_grid(hw):
  """Token by token, the table resized as a whole image is (bilinear, antialiased)."""
  pe = _emb("learned_2d", resolution=6, width=8)
  out = pe(*_grid(*hw))[0].reshape(*hw, 8)
  want = jax.image.resize(pe.table[...], (*hw, 8), "linear", antialias=True)
  np.testing.assert_allclose(out, want, atol=1e-6)
  if hw == (6, 6):  # the table's own grid: the table itself, exactly
    np.testing.assert_array_equal(out, pe.table[...])


def test_learned_2d_grids_share_a_packed_row():
  pe = _emb("learned_2d", resolution=4, width=8)
  (pa, ha), (pb, hb) = _grid(2, 7), _grid(5, 3)
  row = pe(jnp.concatenate([pa, pb], 1), jnp.concatenate([ha, hb], 1))[0]
  np.testing.assert_array_equal(row, jnp.concatenate([pe(pa, ha)[0], pe(pb, hb)[0]]))


def test_learned_2d_is_fractional_only():
  with pytest.raises(ValueError, match="'absolute'"):
    _emb("learned_2d", "absolute")
