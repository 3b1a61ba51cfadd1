"""Text tower: token + learned position embedding, transformer, pooling, projection.

A caption is the tokens of its row up to and including the first EOS (the layout that
`navit_clip.text.tokenizer.Tokenizer.encode` writes); everything after it is padding, whatever
its ids, and a row without EOS is an empty caption slot. Padding gets segment id 0 and real
tokens segment id 1, so attention never mixes the two, and pooling reads real tokens only:
  eos   the output at the caption's EOS (its last real token, not the last position)
  map   multi-head attention pooling over the real tokens
  mean  the mean over the real tokens
Attention is bidirectional, or causal (`causal=True`). Empty slots give finite outputs that
callers mask with the slot mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from navit_clip.config import TEXT_POOLS
from navit_clip.layers import Encoder, MAPHead, dense
from navit_clip.sharding import constrain_batch
from navit_clip.variants import parse_variant


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
    dtype: compute dtype (parameters are float32).
    scan_layers, remat: as in navit_clip.layers.Encoder.
    rngs: parameter initialisation.
  """

  def __init__(self, *, vocab_size: int, max_len: int, width: int, depth: int, mlp_dim: int,
               num_heads: int, out_dim: int, eos_id: int, pool: str = "eos",
               causal: bool = False, qk_norm: bool = True, use_bias: bool = False,
               dtype=jnp.float32, scan_layers: bool = False, remat: str = "none",
               rngs: nnx.Rngs):
    if pool not in TEXT_POOLS:
      raise ValueError(f"text pool {pool!r} is unknown; choose one of {list(TEXT_POOLS)}")
    if not 0 <= eos_id < vocab_size:
      raise ValueError(f"eos_id {eos_id} is outside the vocabulary [0, {vocab_size})")
    if max_len < 1:
      raise ValueError(f"text max_len must be >= 1, got {max_len}")
    self.eos_id, self.pool, self.max_len = eos_id, pool, max_len
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
  def from_config(cls, text_config, out_dim: int, *, rngs: nnx.Rngs) -> TextTower:
    """Builds the tower from config.model.text (see navit_clip.config) and the joint dim."""
    size, patch = parse_variant(text_config.variant)
    if patch is not None:
      raise ValueError(f"config.model.text.variant = {text_config.variant!r} names a patch "
                       "size; the text tower takes a size only, e.g. 'B'")
    return cls(vocab_size=text_config.vocab_size, max_len=text_config.max_len,
               width=size.width, depth=size.depth, mlp_dim=size.mlp_dim,
               num_heads=size.num_heads, out_dim=out_dim, eos_id=text_config.eos_id,
               pool=text_config.pool, causal=text_config.causal,
               qk_norm=text_config.qk_norm, use_bias=text_config.use_bias,
               dtype=jnp.dtype(text_config.dtype), scan_layers=text_config.scan_layers,
               remat=text_config.remat, rngs=rngs)

  def token_features(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token outputs of the final LayerNorm.

    Args:
      tokens: int [N, T], T <= max_len.
    Returns:
      features [N, T, width] in the compute dtype, and int32 [N, T] segment ids (1 = real).
    """
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"text tokens must be integer ids, got {tokens.dtype}")
    if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.max_len:
      raise ValueError(f"text tokens must be [N, T] with 1 <= T <= max_len={self.max_len}, "
                       f"got shape {tokens.shape}")
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
    else:
      real = segment_ids[..., None].astype(jnp.float32)
      pooled = (x.astype(jnp.float32) * real).sum(1) / jnp.maximum(real.sum(1), 1.0)
      pooled = pooled.astype(x.dtype)
    out = self.proj(pooled).astype(jnp.float32)
    return out.reshape(*lead, out.shape[-1])
