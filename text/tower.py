"""Text tower: token + learned position embedding, transformer, pooling, projection.

A caption is the tokens of its row up to and including the first EOS (the layout that
`navit_clip.text.tokenizer.Tokenizer.encode` writes); everything after it is padding, whatever
its ids, and a row without EOS is an empty caption slot. Padding gets segment id 0 and real
tokens segment id 1, so attention never mixes the two, and pooling reads real tokens only
(all but `last`, which reads the padding too):
  eos   the output at the caption's EOS (its last real token, not the last position)
  map   multi-head attention pooling over the real tokens
  mean  the mean over the real tokens
  last  the output at the last position, with no padding mask: every position, padding
        included, attends to every other (SigLIP and SigLIP 2 train their text towers so,
        on captions padded to the full length; `Tokenizer(pad_id=...)` sets the padding)
Attention is bidirectional, or causal (`causal=True`). Empty slots give finite outputs that
callers mask with the slot mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.typing import DTypeLike

from navit_clip.activation_sharding import constrain_batch
from navit_clip.choices import check_choice, check_range, naming
from navit_clip.layers import (COMPUTE_DTYPES, REMAT, Encoder, MAPHead, compute_dtype, dense,
                               segment_mean)
from navit_clip.variants import parse_variant

TEXT_POOLS = ("eos", "map", "mean", "last")


def check_config(text: ml_collections.ConfigDict) -> None:
  """Checks config.model.text, the keys `TextTower.from_config` reads.

  Raises:
    ValueError: naming the key ("config.model.text.pool = ...") and what it must be.
  """
  key = "config.model.text"
  with naming(f"{key}.variant", text.variant):
    _, patch = parse_variant(text.variant)
  if patch is not None:
    raise ValueError(f"{key}.variant = {text.variant!r} names a patch size; the text tower "
                     "takes a size only, e.g. 'B'")
  check_choice(f"{key}.pool", text.pool, TEXT_POOLS)
  check_choice(f"{key}.dtype", text.dtype, COMPUTE_DTYPES)
  check_choice(f"{key}.remat", text.remat, REMAT)
  check_range(f"{key}.max_len", text.max_len, 1)
  if not 0 <= text.eos_id < text.vocab_size:
    raise ValueError(f"{key}.eos_id = {text.eos_id} must be in [0, {key}.vocab_size = "
                     f"{text.vocab_size})")


def caption_segments(tokens: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
  """Segment ids and EOS positions of captions.

  Args:
    tokens: int [N, T].
    eos_id: the tokenizer's EOS id.
  Returns:
    segment_ids: int32 [N, T], 1 up to and including the first EOS, 0 after it (all 0 in a
      row without EOS).
    eos_pos: int32 [N], the index of the first EOS (0 in a row without EOS).
  """
  is_eos = tokens == eos_id
  eos_pos = jnp.argmax(is_eos, axis=-1).astype(jnp.int32)
  upto_eos = jnp.arange(tokens.shape[-1], dtype=jnp.int32) <= eos_pos[:, None]
  segment_ids = (upto_eos & jnp.any(is_eos, axis=-1, keepdims=True)).astype(jnp.int32)
  return segment_ids, eos_pos


class TextTower(nnx.Module):
  """Caption tokens int [..., T] -> float32 embeddings [..., out_dim].

  Args:
    vocab_size: rows of the token embedding (>= the tokenizer's vocabulary size).
    max_len: rows of the position embedding; inputs may be shorter (T <= max_len).
    width, depth, mlp_dim, num_heads: transformer size.
    out_dim: dimension of the projected (joint) embedding.
    eos_id: the tokenizer's EOS id; a caption ends at its first EOS.
    pool: one of TEXT_POOLS.
    causal: each token attends only to itself and earlier tokens.
    qk_norm, use_bias: as in navit_clip.layers.
    dtype: compute dtype, a jnp dtype or its name (navit_clip.layers.compute_dtype);
      parameters are float32.
    scan_layers, remat: as in navit_clip.layers.Encoder.
    rngs: parameter initialisation.
  """

  def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, mlp_dim: int,
               num_heads: int, out_dim: int, eos_id: int, pool: str = "eos",
               causal: bool = False, qk_norm: bool = True, use_bias: bool = False,
               dtype: DTypeLike = jnp.float32, scan_layers: bool = False, remat: str = "none",
               rngs: nnx.Rngs):
    check_choice("text pool", pool, TEXT_POOLS)
    check_range("text eos_id", eos_id, 0, vocab_size, high_open=True)
    check_range("text max_len", max_len, 1)
    self.eos_id, self.pool, self.max_len = eos_id, pool, max_len
    dtype = compute_dtype(dtype)
    self.embed = nnx.Embed(vocab_size, width, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
    self.posemb = nnx.Param(nnx.initializers.normal(stddev=width ** -0.5)(
        rngs.params(), (max_len, width), jnp.float32))
    # Captions are short (tens of tokens): the "xla" reference backend serves them.
    self.encoder = Encoder(width, depth, mlp_dim, num_heads, qk_norm=qk_norm,
                           use_bias=use_bias, dtype=dtype, backend="xla",
                           scan_layers=scan_layers, remat=remat, causal=causal, rngs=rngs)
    if pool == "map":
      self.map_head = MAPHead(width, mlp_dim, num_heads, qk_norm=qk_norm, use_bias=use_bias,
                              dtype=dtype, rngs=rngs)
    else:
      self.map_head = None
    self.proj = dense(width, out_dim, use_bias=use_bias, dtype=dtype, rngs=rngs)

  @classmethod
  def from_config(cls, text_config: ml_collections.ConfigDict, out_dim: int, *,
                  rngs: nnx.Rngs) -> TextTower:
    """Builds the tower from config.model.text (checked by `check_config`) and the joint dim."""
    check_config(text_config)
    size, _ = parse_variant(text_config.variant)
    return cls(vocab_size=text_config.vocab_size, max_len=text_config.max_len,
               width=size.width, depth=size.depth, mlp_dim=size.mlp_dim,
               num_heads=size.num_heads, out_dim=out_dim, eos_id=text_config.eos_id,
               pool=text_config.pool, causal=text_config.causal,
               qk_norm=text_config.qk_norm, use_bias=text_config.use_bias,
               dtype=text_config.dtype, scan_layers=text_config.scan_layers,
               remat=text_config.remat, rngs=rngs)

  def token_features(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token outputs of the final LayerNorm.

    Args:
      tokens: int [N, T], T <= max_len.
    Returns:
      features [N, T, width] in the compute dtype, and int32 [N, T] segment ids (1 = real;
      all 1 with pool "last").
    """
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"text tokens must be integer ids, got {tokens.dtype}")
    if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.max_len:
      raise ValueError(f"text tokens must be [N, T] with 1 <= T <= max_len={self.max_len}, "
                       f"got shape {tokens.shape}")
    if self.pool == "last":
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    else:
      segment_ids, _ = caption_segments(tokens, self.eos_id)
    x = self.embed(tokens)
    x = constrain_batch(x + self.posemb[:tokens.shape[1]].astype(x.dtype))
    return constrain_batch(self.encoder(x, segment_ids)), segment_ids

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int [..., T] (e.g. a packed batch's [B, M, T]) -> float32 [..., out_dim]."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim < 1:
      raise ValueError("text tokens need a trailing length axis [..., T], got a scalar")
    lead = tokens.shape[:-1]
    tokens = tokens.reshape(-1, tokens.shape[-1])
    x, segment_ids = self.token_features(tokens)
    if self.pool == "eos":
      _, eos_pos = caption_segments(tokens, self.eos_id)
      pooled = jnp.take_along_axis(x, eos_pos[:, None, None], axis=1)[:, 0]
    elif self.pool == "map":
      pooled = self.map_head(x, segment_ids, 1)[:, 0]
    elif self.pool == "last":
      pooled = x[:, -1]
    else:
      pooled = segment_mean(x, segment_ids, 1)[:, 0].astype(x.dtype)
    out = self.proj(pooled).astype(jnp.float32)
    return out.reshape(*lead, out.shape[-1])
