"""SigLIP, SigLIP 2 and SigLIP 2 NaFlex checkpoints of transformers, read into our towers.

A transformers checkpoint folder holds config.json (the architecture; keys left at their
defaults are often absent, so the defaults of transformers' SigLIP config classes are
filled in here), model.safetensors (the weights, named after the PyTorch modules) and the
tokenizer files (spiece.model for SigLIP's T5 tokenizer, tokenizer.model for SigLIP 2's
Gemma tokenizer). model_type "siglip" is a fixed-resolution model (SigLIP, and SigLIP 2's
fixed-resolution checkpoints), "siglip2" a NaFlex one. Both map onto the same towers:

  transformers (vision_model. / text_model.)    here (image/ / text/)
  embeddings.patch_embedding                    embedding: Conv2d [D, C, P, P] or Linear
                                                [D, P*P*C], flattened (row, col, channel)
                                                as our patches are
  embeddings.position_embedding [S*S, D]        posemb/table [S, S, D] (posemb learned_2d)
  encoder.layers.i.layer_norm1, .self_attn.{q,k,v,out}_proj, .layer_norm2, .mlp.fc1/fc2
                                                encoder/blocks/i/norm1, attn/{query,key,value,
                                                out}, norm2, mlp/fc1/fc2
  post_layernorm / final_layer_norm             encoder/norm
  head.probe, head.attention (nn.MultiheadAttention: in_proj [3D, D] = q | k | v, out_proj),
  head.layernorm, head.mlp                      head/probe, head/attn/*, head/norm, head/mlp
  embeddings.token_embedding / position_embedding   embed/embedding, posemb
  text head                                     proj
  logit_scale, logit_bias                       logit_scale, logit_bias (t = exp(logit_scale))
Linear weights [out, in] become kernels [in, out]; LayerNorm weights become scales.

The towers these give: pre-LN blocks with biases and no QK-norm, LayerNorm eps 1e-6, tanh
GELU, a MAP head; the text tower pools its last position with no padding mask (pool
"last"), the way SigLIP trained it. Anything else in config.json raises a UserError (a
ValueError) that names the key.

preprocessor_config.json, when the folder has one, gives the inference resolution policy
(navit_clip.evaluate.inference_resolution) that reproduces the checkpoint's image processor:
SiglipImageProcessor squashes an image to size.height x size.width with PIL's bicubic
filter ("square:S"), Siglip2ImageProcessor resizes it, aspect kept, to at most
max_num_patches patches with the bilinear filter ("naflex:N"); both map pixels to
x / 127.5 - 1, as the image tower here does. Without the file: S = vision_config.image_size
and N = vision_config.num_patches, the sizes the model was built for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import ml_collections
import numpy as np

from navit_clip.errors import UserError
from navit_clip.variants import Size, size_name

MODEL_TYPES = {"siglip": False, "siglip2": True}  # model_type -> NaFlex
TOKENIZER_FILES = ("spiece.model", "tokenizer.model")  # SigLIP (T5), SigLIP 2 (Gemma)
# The defaults of transformers' SiglipVisionConfig / Siglip2VisionConfig / SiglipTextConfig.
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       num_patches=256, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                       vision_use_head=True)
TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                     num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                     hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, projection_size=None)
TANH_GELUS = ("gelu_pytorch_tanh", "gelu_new")  # both are 0.5 x (1 + tanh(...)), as ours


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What config.json says, in the terms of our towers."""

  naflex: bool
  vision: Size
  text: Size
  patch_size: int
  channels: int
  posemb_side: int  # S: the position table is S x S
  image_size: int  # fixed resolution: the side its images are squashed to; NaFlex: 0
  vocab_size: int
  text_len: int


def _section(config: dict, name: str, defaults: dict, path: str) -> dict:
  """config[name] over `defaults`, checked against what our towers compute."""
  section = {**defaults, **config.get(name, {})}
  key = f"{path}: {name}"
  if section["hidden_act"] not in TANH_GELUS:
    raise UserError(f"{key}.hidden_act = {section['hidden_act']!r}; the towers here use the "
                    f"tanh GELU, one of {list(TANH_GELUS)}")
  if not math.isclose(section["layer_norm_eps"], 1e-6):
    raise UserError(f"{key}.layer_norm_eps = {section['layer_norm_eps']}; the towers here "
                    "use LayerNorm eps 1e-6")
  return section


def _size(section: dict) -> Size:
  return Size(section["hidden_size"], section["num_hidden_layers"],
              section["intermediate_size"], section["num_attention_heads"])


def _square_side(num_positions: int, what: str) -> int:
  side = math.isqrt(num_positions)
  if side * side != num_positions:
    raise UserError(f"{what} = {num_positions} is not a square number of positions; the "
                    "learned position table must be S x S")
  return side


def read_architecture(src: str) -> Architecture:
  """The Architecture of the transformers checkpoint folder `src` (its config.json)."""
  path = os.path.join(src, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  model_type = config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise UserError(f"{path}: model_type = {model_type!r}; expected one of "
                    f"{list(MODEL_TYPES)} (SigLIP, SigLIP 2, SigLIP 2 NaFlex)")
  naflex = MODEL_TYPES[model_type]
  vision = _section(config, "vision_config", VISION_DEFAULTS, path)
  text = _section(config, "text_config", TEXT_DEFAULTS, path)
  if not vision["vision_use_head"]:
    raise UserError(f"{path}: vision_config.vision_use_head = false; the image tower here "
                    "pools with the MAP head")
  projection = text["projection_size"] or text["hidden_size"]
  if projection != vision["hidden_size"]:
    raise UserError(f"{path}: text_config.projection_size = {projection} differs from "
                    f"vision_config.hidden_size = {vision['hidden_size']}; the text tower "
                    "here projects to the image tower's width")
  patch, image_size = vision["patch_size"], 0
  if naflex:
    side = _square_side(vision["num_patches"], f"{path}: vision_config.num_patches")
  else:
    image_size = vision["image_size"]
    if isinstance(image_size, (list, tuple)):
      if len(set(image_size)) != 1:
        raise UserError(f"{path}: vision_config.image_size = {image_size} is not square")
      image_size = image_size[0]
    side = image_size // patch
  return Architecture(naflex=naflex, vision=_size(vision), text=_size(text), patch_size=patch,
                      channels=vision["num_channels"], posemb_side=side,
                      image_size=image_size, vocab_size=text["vocab_size"],
                      text_len=text["max_position_embeddings"])


# preprocessor_config.json keys that must hold these values: pixels -> x / 127.5 - 1.
PIXEL_MAPPING = dict(do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
RESAMPLE = {False: (3, "bicubic"), True: (2, "bilinear")}  # NaFlex -> PIL filter, its name


def _check_processor(processor: dict, arch: Architecture, path: str) -> None:
  """Raises UserError if the processor at `path` prepares pixels otherwise than here."""
  for key, want in PIXEL_MAPPING.items():
    got = processor.get(key, want)
    if not np.allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), atol=1e-6):
      raise UserError(f"{path}: {key} = {got!r}; the image tower here maps pixels to "
                      f"x / 127.5 - 1 ({key} = {want!r})")
  resample, name = RESAMPLE[arch.naflex]
  if processor.get("resample", resample) != resample:
    raise UserError(f"{path}: resample = {processor['resample']!r}; this checkpoint's "
                    f"policy resizes with PIL's {name} filter ({resample})")
  if processor.get("patch_size", arch.patch_size) != arch.patch_size:
    raise UserError(f"{path}: patch_size = {processor['patch_size']} differs from "
                    f"vision_config.patch_size = {arch.patch_size}")


def inference_resolution(src: str, arch: Architecture) -> str:
  """The inference resolution policy of `src`'s image processor: "square:S" or "naflex:N".

  Read from `src`/preprocessor_config.json when there is one (see the module docstring).
  """
  path = os.path.join(src, "preprocessor_config.json")
  processor = {}
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      processor = json.load(f)
    _check_processor(processor, arch, path)
  if arch.naflex:
    return f"naflex:{processor.get('max_num_patches', arch.posemb_side ** 2)}"
  size = processor.get("size", {"height": arch.image_size, "width": arch.image_size})
  if set(size) != {"height", "width"} or size["height"] != size["width"]:
    raise UserError(f"{path}: size = {size}; a fixed-resolution checkpoint here resizes to "
                    "a square {'height': S, 'width': S}")
  return f"square:{size['height']}"


def configure(config: ml_collections.ConfigDict, arch: Architecture) -> None:
  """Sets config.model (both towers) and config.loss to reproduce `arch`."""
  img = config.model.image
  img.variant = f"{size_name(arch.vision)}/{arch.patch_size}"
  img.channels = arch.channels
  img.posemb, img.posemb_coords = "learned_2d", "fractional"
  img.posemb_resolution = arch.posemb_side
  img.qk_norm, img.use_bias, img.pool = False, True, "map"
  txt = config.model.text
  txt.variant = size_name(arch.text)
  txt.vocab_size, txt.max_len = arch.vocab_size, arch.text_len
  txt.pool, txt.causal, txt.qk_norm, txt.use_bias = "last", False, False, True
  config.loss.name = "sigmoid"


class Tensors:
  """The tensors of a model.safetensors file, taken one by one; checks names and shapes."""

  def __init__(self, path: str, arrays: dict[str, np.ndarray]):
    self.path, self._arrays, self._taken = path, arrays, set()

  def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 copy of tensor `name`; UserError if it is missing or not of `shape`."""
    if name not in self._arrays:
      raise UserError(f"{self.path}: tensor {name!r} is missing")
    array = self._arrays[name]
    if tuple(array.shape) != tuple(shape):
      raise UserError(f"{self.path}: tensor {name!r} has shape {list(array.shape)}, "
                      f"expected {list(shape)}")
    self._taken.add(name)
    return np.asarray(array, np.float32)

  def check_all_taken(self) -> None:
    extra = sorted(set(self._arrays) - self._taken)
    if extra:
      raise UserError(f"{self.path}: {len(extra)} tensors that the model has no place for: "
                      f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")


def _linear(t: Tensors, name: str, din: int, dout: int) -> dict:
  return {"kernel": t.take(f"{name}.weight", (dout, din)).T,
          "bias": t.take(f"{name}.bias", (dout,))}


def _norm(t: Tensors, name: str, dim: int) -> dict:
  return {"scale": t.take(f"{name}.weight", (dim,)), "bias": t.take(f"{name}.bias", (dim,))}


def _mlp(t: Tensors, name: str, size: Size) -> dict:
  return {"fc1": _linear(t, f"{name}.fc1", size.width, size.mlp_dim),
          "fc2": _linear(t, f"{name}.fc2", size.mlp_dim, size.width)}


def _encoder(t: Tensors, tower: str, size: Size, final_norm: str) -> dict:
  """encoder/blocks/i and encoder/norm of `tower` ("vision_model" or "text_model")."""
  d, blocks = size.width, {}
  for i in range(size.depth):
    name = f"{tower}.encoder.layers.{i}"
    attn = {ours: _linear(t, f"{name}.self_attn.{theirs}", d, d) for ours, theirs in
            (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("out", "out_proj"))}
    blocks[i] = {"norm1": _norm(t, f"{name}.layer_norm1", d), "attn": attn,
                 "norm2": _norm(t, f"{name}.layer_norm2", d),
                 "mlp": _mlp(t, f"{name}.mlp", size)}
  return {"blocks": blocks, "norm": _norm(t, f"{tower}.{final_norm}", d)}


def _map_head(t: Tensors, size: Size) -> dict:
  """image/head: nn.MultiheadAttention's packed in_proj split into query, key, value."""
  d, name = size.width, "vision_model.head"
  in_w = t.take(f"{name}.attention.in_proj_weight", (3 * d, d))
  in_b = t.take(f"{name}.attention.in_proj_bias", (3 * d,))
  attn = {ours: {"kernel": in_w[k * d:(k + 1) * d].T, "bias": in_b[k * d:(k + 1) * d]}
          for k, ours in enumerate(("query", "key", "value"))}
  attn["out"] = _linear(t, f"{name}.attention.out_proj", d, d)
  return {"probe": t.take(f"{name}.probe", (1, 1, d)).reshape(1, d), "attn": attn,
          "norm": _norm(t, f"{name}.layernorm", d), "mlp": _mlp(t, f"{name}.mlp", size)}


def _image_params(t: Tensors, arch: Architecture) -> dict:
  d, p, c, s = arch.vision.width, arch.patch_size, arch.channels, arch.posemb_side
  name = "vision_model.embeddings"
  if arch.naflex:  # Linear over patches already flattened (row, col, channel)
    kernel = t.take(f"{name}.patch_embedding.weight", (d, p * p * c)).T
  else:  # Conv2d [D, C, P, P] -> [(row, col, channel), D]
    kernel = t.take(f"{name}.patch_embedding.weight", (d, c, p, p))
    kernel = kernel.transpose(2, 3, 1, 0).reshape(p * p * c, d)
  return {"embedding": {"kernel": kernel, "bias": t.take(f"{name}.patch_embedding.bias", (d,))},
          "posemb": {"table": t.take(f"{name}.position_embedding.weight",
                                     (s * s, d)).reshape(s, s, d)},
          "encoder": _encoder(t, "vision_model", arch.vision, "post_layernorm"),
          "head": _map_head(t, arch.vision)}


def _text_params(t: Tensors, arch: Architecture) -> dict:
  d, name = arch.text.width, "text_model.embeddings"
  return {"embed": {"embedding": t.take(f"{name}.token_embedding.weight",
                                        (arch.vocab_size, d))},
          "posemb": t.take(f"{name}.position_embedding.weight", (arch.text_len, d)),
          "encoder": _encoder(t, "text_model", arch.text, "final_layer_norm"),
          "proj": _linear(t, "text_model.head", d, arch.vision.width)}


def read_params(src: str, arch: Architecture) -> dict:
  """The two-tower parameters (a nested dict of float32 arrays, as nnx.to_pure_dict gives
  them) from `src`/model.safetensors; UserError on a missing, misshapen or extra tensor."""
  from safetensors.numpy import load_file  # read only when importing a checkpoint

  path = os.path.join(src, "model.safetensors")
  t = Tensors(path, load_file(path))
  params = {"image": _image_params(t, arch), "text": _text_params(t, arch),
            "logit_scale": t.take("logit_scale", (1,)).reshape(()),
            "logit_bias": t.take("logit_bias", (1,)).reshape(())}
  t.check_all_taken()
  return params


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
  """The SentencePiece model of a checkpoint folder and how captions are padded."""

  model_path: str
  pad_piece: str  # the piece written after EOS


def find_tokenizer(src: str) -> TokenizerFiles:
  """The tokenizer of the checkpoint folder `src`.

  Captions are padded with tokenizer_config.json's pad_token; without one, SigLIP's
  spiece.model pads with EOS "</s>" (SiglipTokenizer, big_vision's pad_value=1) and
  SigLIP 2's tokenizer.model with Gemma's "<pad>".
  """
  found = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(src, name))]
  if not found:
    raise UserError(f"{src}: no tokenizer ({' or '.join(TOKENIZER_FILES)}) beside the "
                    "checkpoint")
  pad = "</s>" if found[0] == "spiece.model" else "<pad>"
  config_path = os.path.join(src, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      pad = json.load(f).get("pad_token", pad)
    if isinstance(pad, dict):  # a serialised AddedToken
      pad = pad["content"]
  return TokenizerFiles(os.path.join(src, found[0]), pad)
