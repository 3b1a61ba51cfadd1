"""SigLIP, SigLIP 2 and SigLIP 2 NaFlex checkpoints of big_vision (.npz), read into our towers.

big_vision releases a SigLIP model as one .npz file: the flattened parameter tree of its
`two_towers` model, one array per leaf, named by the path with "/" (usually under
"params/"): "img" the image tower (models/vit.py, or proj/image_text/naflex_vit.py for
NaFlex), "txt" the text tower (proj/image_text/text_transformer.py), "t" the log
temperature and "b" the bias. The file holds no config: the architecture is read from the
tensors' shapes (`read_architecture`). The mapping, with
D the width, H heads of Dh, M the MLP width, P the patch, S x S the position table:

  big_vision (img/, txt/)                         here (image/, text/)
  img/embedding: Conv kernel [P, P, C, D]         embedding: kernel [(row, col, channel), D]
    or, NaFlex, Dense kernel [P*P*3, D]
  img/pos_embedding [1, S*S, D], NaFlex [S, S, D]  posemb/table [S, S, D]
  {img/Transformer, txt/Encoder_0}/encoderblock_i (or one scanned "encoderblock" whose
    arrays have a leading layer axis):
    LayerNorm_0, LayerNorm_1                      encoder/blocks/i/norm1, norm2
    MultiHeadDotProductAttention_0/{query,key,value}: kernel [D, H, Dh], bias [H, Dh];
    .../out: kernel [H, Dh, D], bias [D]          attn/{query,key,value,out}
    MlpBlock_0/Dense_0, Dense_1                   mlp/fc1, fc2
  {img/Transformer, txt/Encoder_0}/encoder_norm   encoder/norm
  img/MAPHead_0: probe [1, 1, D], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0
                                                  head/probe, attn, norm, mlp
  txt/Embed_0/embedding [V, D], txt/pos_embedding [1, L, D]   embed/embedding, posemb
  txt/head (Dense to the image width)             proj
  t, b [1]                                        logit_scale, logit_bias
Dense kernels are [in, out] as ours; LayerNorm "scale" and "bias" as ours. bfloat16 arrays
(which numpy stores as 2-byte void) are read as bfloat16 and widened to float32.

The towers are transformers_siglip's (its `configure`): big_vision's SigLIP models are
what transformers' SiglipModel / Siglip2Model reimplement (pre-LN, biases, LayerNorm eps
1e-6, tanh GELU, MAP head, text pooled at its last position). The inference resolution
policy is the one transformers' image processor of the same release uses: "square:{S*P}"
(the position grid times the patch, in pixels) for fixed-resolution models, "naflex:{S*S}"
for NaFlex ones. The SentencePiece model comes from elsewhere (`find_tokenizer`), and
captions are padded as big_vision's configs pad them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import ml_dtypes
import numpy as np
import sentencepiece as spm

from navit_clip.errors import MissingInputError, UserError
from navit_clip.transformers_siglip import (TOKENIZER_FILES, Architecture, Tensors,
                                            TokenizerFiles)
from navit_clip.variants import Size

PREFIXES = ("params/", "opt/target/", "")  # optax-state, flax-optimizer and bare files
IMAGE_ENCODER, TEXT_ENCODER = "img/Transformer", "txt/Encoder_0"
_SCANNED = re.compile(r"(.*/encoderblock)/(.*)")
CHANNELS = 3  # a NaFlex Dense patch embedding [P*P*C, D] is read with C = 3 (RGB)


@dataclasses.dataclass
class Checkpoint:
  """The arrays of a big_vision .npz, by name; scanned layers split into one per layer.

  A scanned block array "X/encoderblock/Y" [depth, ...] becomes "X/encoderblock[i]/Y".
  """

  path: str
  prefix: str  # the part of every name before "img/", "txt/", "t", "b"
  arrays: dict[str, np.ndarray]

  def __post_init__(self):
    self.tensors = Tensors(self.path, self.arrays)

  def name(self, rel: str) -> str:
    return self.prefix + rel

  def shape(self, rel: str, ndim: int) -> tuple[int, ...]:
    """The shape of tensor `rel` (after the prefix); UserError if it is missing or has
    other than `ndim` dimensions."""
    name = self.name(rel)
    if name not in self.arrays:
      raise UserError(f"{self.path}: tensor {name!r} is missing; is this a big_vision SigLIP "
                      "two_towers checkpoint?")
    shape = tuple(self.arrays[name].shape)
    if len(shape) != ndim:
      raise UserError(f"{self.path}: tensor {name!r} has shape {list(shape)}, expected "
                      f"{ndim} dimensions")
    return shape

  def take(self, rel: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 copy of tensor `rel`; UserError if it is missing or not of `shape`."""
    return self.tensors.take(self.name(rel), shape)


def _widened(array: np.ndarray) -> np.ndarray:
  """`array`, with numpy's 2-byte void (how np.savez stores bfloat16) read as bfloat16."""
  if array.dtype.type is np.void and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def _split_scanned(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Scanned "X/encoderblock/Y" [depth, ...] arrays as "X/encoderblock[i]/Y" [...]."""
  out = {}
  for name, array in arrays.items():
    scanned = _SCANNED.fullmatch(name)
    if scanned is None or array.ndim == 0:
      out[name] = array
      continue
    out.update({f"{scanned[1]}[{i}]/{scanned[2]}": layer for i, layer in enumerate(array)})
  return out


def load(path: str) -> Checkpoint:
  """The arrays of the .npz file `path`; UserError if it is not a big_vision two_towers one."""
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {name: _widened(data[name]) for name in data.files}
  except (OSError, ValueError) as e:  # not a zip of .npy arrays, or an object array
    raise UserError(f"{path}: not a .npz file of arrays ({e})") from e
  arrays = _split_scanned(arrays)
  for prefix in PREFIXES:
    if f"{prefix}img/embedding/kernel" in arrays:
      return Checkpoint(path, prefix, arrays)
  raise UserError(f"{path}: no big_vision two_towers image tower (a tensor "
                  f"'params/img/embedding/kernel'); found {sorted(arrays)[:4]}")


def _block(ckpt: Checkpoint, encoder: str, i: int, rel: str) -> str:
  """The name (after the prefix) of `rel` in block `i` of `encoder`, in the file's layout."""
  if any(name.startswith(ckpt.name(f"{encoder}/encoderblock[")) for name in ckpt.arrays):
    return f"{encoder}/encoderblock[{i}]/{rel}"
  return f"{encoder}/encoderblock_{i}/{rel}"


def _depth(ckpt: Checkpoint, encoder: str) -> int:
  """The number of blocks of `encoder`: its encoderblock_i, or its scanned stack's length."""
  layer = re.compile(re.escape(ckpt.name(encoder)) + r"/encoderblock(?:_(\d+)|\[(\d+)\])/")
  layers = {int(m[1] or m[2]) for name in ckpt.arrays if (m := layer.match(name))}
  if not layers:
    raise UserError(f"{ckpt.path}: no blocks under {ckpt.name(encoder)!r} (encoderblock_0/... "
                    "or a scanned encoderblock/...)")
  return max(layers) + 1


def _size(ckpt: Checkpoint, encoder: str) -> Size:
  """width, depth, MLP width and heads of `encoder` from its block 0's shapes."""
  width, heads, _ = ckpt.shape(_block(ckpt, encoder, 0,
                                      "MultiHeadDotProductAttention_0/query/kernel"), 3)
  _, mlp = ckpt.shape(_block(ckpt, encoder, 0, "MlpBlock_0/Dense_0/kernel"), 2)
  return Size(width, _depth(ckpt, encoder), mlp, heads)


def _patch_and_side(ckpt: Checkpoint, width: int) -> tuple[bool, int, int, int]:
  """(NaFlex, patch, channels, S) from the patch embedding and the position table."""
  kernel = ckpt.arrays[ckpt.name("img/embedding/kernel")].shape  # present: see `load`
  pos = ckpt.shape("img/pos_embedding", 3)
  where = f"{ckpt.path}: {ckpt.name('img/embedding/kernel')}"
  if len(kernel) == 4 and pos[0] == 1:  # vit.py: Conv, [1, S*S, D]
    if kernel[0] != kernel[1]:
      raise UserError(f"{where} has shape {list(kernel)}: the patch is not square")
    side = math.isqrt(pos[1])
    if side * side != pos[1]:
      raise UserError(f"{ckpt.path}: {ckpt.name('img/pos_embedding')} has {pos[1]} positions, "
                      "not a square number; the learned position table must be S x S")
    return False, kernel[0], kernel[2], side
  if len(kernel) == 2 and pos[0] == pos[1]:  # naflex_vit.py: Dense, [S, S, D]
    patch = math.isqrt(kernel[0] // CHANNELS)
    if patch * patch * CHANNELS != kernel[0]:
      raise UserError(f"{where} has shape {list(kernel)}: {kernel[0]} is not P * P * 3")
    return True, patch, CHANNELS, pos[0]
  raise UserError(f"{where} has shape {list(kernel)} and pos_embedding {list(pos)}: neither "
                  f"a vit.py ([P, P, C, {width}], [1, S*S, {width}]) nor a naflex_vit.py "
                  f"([P*P*3, {width}], [S, S, {width}]) image tower")


def read_architecture(ckpt: Checkpoint) -> Architecture:
  """The Architecture of `ckpt`, from the shapes of its tensors."""
  vision, text = _size(ckpt, IMAGE_ENCODER), _size(ckpt, TEXT_ENCODER)
  naflex, patch, channels, side = _patch_and_side(ckpt, vision.width)
  vocab, _ = ckpt.shape("txt/Embed_0/embedding", 2)
  _, text_len, _ = ckpt.shape("txt/pos_embedding", 3)
  _, projection = ckpt.shape("txt/head/kernel", 2)
  if projection != vision.width:
    raise UserError(f"{ckpt.path}: {ckpt.name('txt/head/kernel')} projects to {projection}, "
                    f"not the image tower's width {vision.width}; the text tower here "
                    "projects to the image tower's width")
  return Architecture(naflex=naflex, vision=vision, text=text, patch_size=patch,
                      channels=channels, posemb_side=side,
                      image_size=0 if naflex else side * patch, vocab_size=vocab,
                      text_len=text_len)


def inference_resolution(arch: Architecture) -> str:
  """The policy of transformers' processor for the same release: square:S or naflex:S*S."""
  return f"naflex:{arch.posemb_side ** 2}" if arch.naflex else f"square:{arch.image_size}"


def _dense(ckpt: Checkpoint, name: str, din: int, dout: int) -> dict:
  return {"kernel": ckpt.take(f"{name}/kernel", (din, dout)),
          "bias": ckpt.take(f"{name}/bias", (dout,))}


def _norm(ckpt: Checkpoint, name: str, dim: int) -> dict:
  return {"scale": ckpt.take(f"{name}/scale", (dim,)),
          "bias": ckpt.take(f"{name}/bias", (dim,))}


def _mlp(ckpt: Checkpoint, name: str, size: Size) -> dict:
  return {"fc1": _dense(ckpt, f"{name}/Dense_0", size.width, size.mlp_dim),
          "fc2": _dense(ckpt, f"{name}/Dense_1", size.mlp_dim, size.width)}


def _attention(ckpt: Checkpoint, name: str, size: Size) -> dict:
  """MultiHeadDotProductAttention's per-head kernels as our [D, D] query/key/value/out."""
  d, h = size.width, size.num_heads
  dh = d // h
  attn = {ours: {"kernel": ckpt.take(f"{name}/{ours}/kernel", (d, h, dh)).reshape(d, d),
                 "bias": ckpt.take(f"{name}/{ours}/bias", (h, dh)).reshape(d)}
          for ours in ("query", "key", "value")}
  attn["out"] = {"kernel": ckpt.take(f"{name}/out/kernel", (h, dh, d)).reshape(d, d),
                 "bias": ckpt.take(f"{name}/out/bias", (d,))}
  return attn


def _encoder(ckpt: Checkpoint, encoder: str, size: Size) -> dict:
  """encoder/blocks/i and encoder/norm of `encoder` (IMAGE_ENCODER or TEXT_ENCODER)."""
  d, blocks = size.width, {}
  for i in range(size.depth):
    def part(rel: str, i=i) -> str:
      return _block(ckpt, encoder, i, rel)
    blocks[i] = {"norm1": _norm(ckpt, part("LayerNorm_0"), d),
                 "attn": _attention(ckpt, part("MultiHeadDotProductAttention_0"), size),
                 "norm2": _norm(ckpt, part("LayerNorm_1"), d),
                 "mlp": _mlp(ckpt, part("MlpBlock_0"), size)}
  return {"blocks": blocks, "norm": _norm(ckpt, f"{encoder}/encoder_norm", d)}


def _image_params(ckpt: Checkpoint, arch: Architecture) -> dict:
  d, p, c, s = arch.vision.width, arch.patch_size, arch.channels, arch.posemb_side
  if arch.naflex:  # Dense over patches flattened (row, col, channel), as ours
    kernel = ckpt.take("img/embedding/kernel", (p * p * c, d))
    table = ckpt.take("img/pos_embedding", (s, s, d))
  else:  # Conv [P, P, C, D] -> [(row, col, channel), D]
    kernel = ckpt.take("img/embedding/kernel", (p, p, c, d)).reshape(p * p * c, d)
    table = ckpt.take("img/pos_embedding", (1, s * s, d)).reshape(s, s, d)
  head = "img/MAPHead_0"
  return {"embedding": {"kernel": kernel, "bias": ckpt.take("img/embedding/bias", (d,))},
          "posemb": {"table": table},
          "encoder": _encoder(ckpt, IMAGE_ENCODER, arch.vision),
          "head": {"probe": ckpt.take(f"{head}/probe", (1, 1, d)).reshape(1, d),
                   "attn": _attention(ckpt, f"{head}/MultiHeadDotProductAttention_0",
                                      arch.vision),
                   "norm": _norm(ckpt, f"{head}/LayerNorm_0", d),
                   "mlp": _mlp(ckpt, f"{head}/MlpBlock_0", arch.vision)}}


def _text_params(ckpt: Checkpoint, arch: Architecture) -> dict:
  d = arch.text.width
  return {"embed": {"embedding": ckpt.take("txt/Embed_0/embedding", (arch.vocab_size, d))},
          "posemb": ckpt.take("txt/pos_embedding", (1, arch.text_len, d)).reshape(
              arch.text_len, d),
          "encoder": _encoder(ckpt, TEXT_ENCODER, arch.text),
          "proj": _dense(ckpt, "txt/head", d, arch.vision.width)}


def read_params(ckpt: Checkpoint, arch: Architecture) -> dict:
  """The two-tower parameters (a nested dict of float32 arrays, as nnx.to_pure_dict gives
  them); UserError on a missing, misshapen or extra tensor."""
  params = {"image": _image_params(ckpt, arch), "text": _text_params(ckpt, arch),
            "logit_scale": ckpt.take("t", (1,)).reshape(()),
            "logit_bias": ckpt.take("b", (1,)).reshape(())}
  ckpt.tensors.check_all_taken()
  return params


def find_tokenizer(path: str, tokenizer: str | None) -> TokenizerFiles:
  """The SentencePiece model `tokenizer`, or else spiece.model / tokenizer.model beside the
  .npz `path`, and the piece that pads captions.

  big_vision pads SigLIP's captions (T5 / mT5 SentencePiece models, which have no BOS) with
  EOS, and SigLIP 2's (the Gemma model, which has one) with its pad piece.
  """
  if not tokenizer:
    folder = os.path.dirname(os.path.abspath(path))
    found = [os.path.join(folder, n) for n in TOKENIZER_FILES
             if os.path.isfile(os.path.join(folder, n))]
    if not found:
      raise UserError(f"{path}: a big_vision checkpoint has no tokenizer in it; give its "
                      f"SentencePiece model (--tokenizer) or put it beside the file as "
                      f"{' or '.join(TOKENIZER_FILES)}")
    tokenizer = found[0]
  if not os.path.isfile(tokenizer):
    raise MissingInputError(f"tokenizer {tokenizer!r} does not exist")
  try:
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
  except (OSError, RuntimeError) as e:
    raise UserError(f"tokenizer {tokenizer!r} is not a SentencePiece model: {e}") from e
  pad_id = sp.eos_id() if sp.bos_id() < 0 else sp.pad_id()
  if pad_id < 0:
    raise UserError(f"tokenizer {tokenizer!r} has no {'EOS' if sp.bos_id() < 0 else 'pad'} "
                    "piece to pad captions with")
  return TokenizerFiles(os.path.abspath(tokenizer), sp.id_to_piece(pad_id))
