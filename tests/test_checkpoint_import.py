"""Importing SigLIP checkpoints (transformers folders, big_vision .npz files): our towers
give what transformers computes.

The fixtures in tests/fixtures/siglip (written by make_fixtures.py there, with transformers)
are tiny random SigLIP, SigLIP 2 and SigLIP 2 NaFlex models and transformers' outputs for
six images and four captions. Each model is imported into a workdir and restored from it;
its images are preprocessed here from the raw uint8 pixels, patchified and packed six to a
row, six rows, so that every image sits at every slot of a row beside all the others.
The tests that share the imported models are slow: importing and compiling three models
takes about half a minute on two cores.

The commands on imported workdirs: `navit-clip import`, then `embed` (texts through the
configured tokenizer, images from PNG files through the policy the import recorded) equal
transformers; `eval --zeroshot` and `export` run on them; a run starts from one
(config.init, LiT). The same weights in big_vision's .npz layout (big_vision.npz in each
fixture folder, written by make_big_vision_fixtures.py) import to the same towers and give
transformers' outputs too.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from safetensors.numpy import load_file, save_file

from navit_clip import big_vision_siglip
from navit_clip import config as config_lib
from navit_clip.checkpoint_import import import_checkpoint
from navit_clip.data.batch import BatchSpec
from navit_clip.data.pack import assemble_batch
from navit_clip.data.patchify import patchify, resize
from navit_clip.data.resolution_sampling import naflex_size
from navit_clip.errors import MissingInputError, UserError
from navit_clip.evaluate.restore import restore_model
from navit_clip.text.tokenizer import Tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "siglip"
NAMES = ("siglip", "siglip2", "siglip2_naflex")
TOL = 1e-4
PATCH = {"siglip": 8, "siglip2": 4, "siglip2_naflex": 4}
BUDGETS = {"siglip": ("fixed",), "siglip2": ("fixed",),
           "siglip2_naflex": ("budget64", "budget24")}


@pytest.fixture(scope="module")
def inputs() -> tuple[list[np.ndarray], list[str]]:
  data = np.load(FIXTURES / "inputs.npz")
  images = [data[f"image_{i}"] for i in range(sum(k.startswith("image_") for k in data))]
  return images, [str(c) for c in data["captions"]]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """name -> (restored model, its config, reference outputs)."""
  out = {}
  for name in NAMES:
    workdir = tmp_path_factory.mktemp(name)
    import_checkpoint(str(FIXTURES / name), str(workdir))
    restored = restore_model(str(workdir))
    out[name] = (restored.model, restored.config, dict(np.load(FIXTURES / name / "reference.npz")))
  return out


def _processor_pixels(pixel_values: np.ndarray) -> np.ndarray:
  """transformers' normalised pixels (x / 127.5 - 1) back to the uint8 they came from."""
  values = (pixel_values.astype(np.float64) + 1.0) * 127.5
  assert np.abs(values - np.rint(values)).max() < 1e-3
  return np.rint(values).astype(np.uint8)


def _fixed_examples(images, ref, image_size: int, patch: int) -> list[dict]:
  """SiglipImageProcessor's images: squashed to a square with PIL's bicubic filter."""
  examples = []
  for i, image in enumerate(images):
    square = np.asarray(Image.fromarray(image).resize((image_size, image_size),
                                                      Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(square, _processor_pixels(
        ref["fixed/pixel_values"][i].transpose(1, 2, 0)))
    patches, positions, grid = patchify(square, patch)
    examples.append(dict(patches=patches, positions=positions, grid_hw=grid, example_id=i))
  return examples


def _naflex_examples(images, ref, budget_key: str, patch: int) -> list[dict]:
  """Siglip2ImageProcessor's images, made here: naflex_size, our resize and patchify."""
  budget = ref[f"{budget_key}/pixel_values"].shape[1]
  examples = []
  for i, image in enumerate(images):
    size = naflex_size(*image.shape[:2], patch, budget)
    patches, positions, grid = patchify(resize(image, size), patch)
    np.testing.assert_array_equal(grid, ref[f"{budget_key}/spatial_shapes"][i])
    n = int(ref[f"{budget_key}/pixel_attention_mask"][i].sum())
    np.testing.assert_array_equal(
        patches, _processor_pixels(ref[f"{budget_key}/pixel_values"][i, :n]))
    examples.append(dict(patches=patches, positions=positions, grid_hw=grid, example_id=i))
  return examples


def _every_image_at_every_slot(examples: list[dict], patch: int) -> dict:
  """n rows of the n images: row r, slot k holds image (r + k) % n; a few padding tokens."""
  n = len(examples)
  spec = BatchSpec(batch_size=n, seq_len=sum(len(e["patches"]) for e in examples) + 3,
                   max_images=n, patch_size=patch)
  return assemble_batch([[examples[(r + k) % n] for k in range(n)] for r in range(n)], spec)


def _examples(name, budget_key, images, ref):
  if budget_key == "fixed":
    return _fixed_examples(images, ref, 32, PATCH[name])
  return _naflex_examples(images, ref, budget_key, PATCH[name])


def _slot_reference(reference: np.ndarray) -> np.ndarray:
  """reference [n, ...] laid out as _every_image_at_every_slot packs it: [n rows, n slots, ...]."""
  n = len(reference)
  return np.stack([reference[(r + np.arange(n)) % n] for r in range(n)])


@nnx.jit
def _embed(model, batch):
  """(pooled image embeddings, their L2-normalised form, slot mask)."""
  emb, mask = model.image(batch)
  return emb, model.embed_images(batch)[0], mask


def _packed_embeddings(model, name, budget_key, images, ref):
  """(pooled, normalised) image embeddings [6 rows, 6 slots, D] of every image at every slot."""
  batch = _every_image_at_every_slot(_examples(name, budget_key, images, ref), PATCH[name])
  emb, zimg, mask = _embed(model, {k: jnp.asarray(v) for k, v in batch.items()})
  assert bool(mask.all())
  return np.asarray(emb), zimg


@pytest.fixture(scope="module")
def packed(imported, inputs):
  """(name, budget) -> (pooled, normalised) image embeddings [6 rows, 6 slots, D]."""
  images, _ = inputs
  out = {}
  for name in NAMES:
    model, _, ref = imported[name]
    for budget_key in BUDGETS[name]:
      out[name, budget_key] = _packed_embeddings(model, name, budget_key, images, ref)
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name,budget_key", [(n, b) for n in NAMES for b in BUDGETS[n]])
def test_packed_image_embeddings_equal_transformers_at_every_slot(packed, imported, name,
                                                                  budget_key):
  _, _, ref = imported[name]
  emb, zimg = packed[name, budget_key]
  np.testing.assert_allclose(emb, _slot_reference(ref[f"{budget_key}/image_embeds"]),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(zimg),
                             _slot_reference(ref[f"{budget_key}/image_embeds_normalized"]),
                             atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_text_embeddings_and_tokens_equal_transformers(imported, inputs, name):
  model, config, ref = imported[name]
  _, captions = inputs
  tok = config.data.tokenizer
  tokenizer = Tokenizer(tok.path, config.model.text.max_len, lowercase=tok.lowercase,
                        pad_id=tok.pad_id)
  np.testing.assert_array_equal(tokenizer.encode(captions), ref["input_ids"])
  emb, zemb = nnx.jit(lambda m, t: (m.text(t), m.embed_texts(t)))(model, ref["input_ids"])
  np.testing.assert_allclose(np.asarray(emb), ref["text_embeds"], atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(zemb), ref["text_embeds_normalized"], atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name,budget_key", [(n, b) for n in NAMES for b in BUDGETS[n]])
def test_logits_equal_transformers(packed, imported, name, budget_key):
  model, _, ref = imported[name]
  _, zimg = packed[name, budget_key]
  ztxt = nnx.jit(lambda m, t: m.embed_texts(t))(model, ref["input_ids"])
  logits = (jnp.exp(model.logit_scale[...]) * jnp.einsum("rkd,td->rkt", zimg, ztxt)
            + model.logit_bias[...])
  np.testing.assert_allclose(np.asarray(logits),
                             _slot_reference(ref[f"{budget_key}/logits_per_image"]),
                             atol=TOL, rtol=0)


@pytest.mark.slow
def test_imported_config_describes_the_checkpoint(imported):
  _, config, _ = imported["siglip2_naflex"]
  config_lib.validate(config)
  img, txt = config.model.image, config.model.text
  assert (img.variant, img.posemb, img.posemb_resolution) == ("w32-d2-m64-h2/4", "learned_2d", 8)
  assert (img.qk_norm, img.use_bias, img.pool) == (False, True, "map")
  assert (txt.variant, txt.pool, txt.vocab_size, txt.max_len) == ("w24-d2-m48-h2", "last", 320,
                                                                  16)
  assert (config.data.tokenizer.pad_id, txt.eos_id, config.loss.name) == (0, 1, "sigmoid")
  _, siglip, _ = imported["siglip"]
  assert siglip.data.tokenizer.pad_id == siglip.model.text.eos_id == 1  # padded with EOS


def _copy(name: str, tmp_path: Path) -> Path:
  src = tmp_path / "src"
  shutil.copytree(FIXTURES / name, src)
  return src


@pytest.mark.slow
def test_config_keys_at_their_transformers_defaults_may_be_absent(tmp_path, imported):
  src = _copy("siglip", tmp_path)
  config = json.loads((src / "config.json").read_text())
  for section in ("vision_config", "text_config"):
    for key in ("hidden_act", "layer_norm_eps", "num_channels", "vision_use_head",
                "attention_dropout"):
      config[section].pop(key, None)
  (src / "config.json").write_text(json.dumps(config))
  imported_config = import_checkpoint(str(src), str(tmp_path / "work"))
  assert imported_config.model.to_dict() == imported["siglip"][1].model.to_dict()


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("vision_model.head.probe"), "'vision_model.head.probe' is missing"),
    (lambda t: t.update(extra=np.zeros(2, np.float32)), "1 tensors that the model has no place"),
    (lambda t: t.update({"logit_bias": np.zeros(2, np.float32)}), "'logit_bias' has shape"),
])
def test_a_missing_extra_or_misshapen_tensor_is_named(tmp_path, change, message):
  src = _copy("siglip", tmp_path)
  tensors = load_file(src / "model.safetensors")
  change(tensors)
  save_file(tensors, src / "model.safetensors")
  with pytest.raises(ValueError, match=message):
    import_checkpoint(str(src), str(tmp_path / "work"))


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(model_type="clip"), "model_type = 'clip'"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "hidden_act = 'gelu'"),
    (lambda c: c["text_config"].update(projection_size=16), "projection_size = 16"),
])
def test_an_unsupported_config_is_named(tmp_path, edit, message):
  src = _copy("siglip", tmp_path)
  config = json.loads((src / "config.json").read_text())
  edit(config)
  (src / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=message):
    import_checkpoint(str(src), str(tmp_path / "work"))


def test_a_workdir_with_checkpoints_is_refused(tmp_path):
  import_checkpoint(str(FIXTURES / "siglip"), str(tmp_path))
  with pytest.raises(ValueError, match="already holds checkpoints"):
    import_checkpoint(str(FIXTURES / "siglip"), str(tmp_path))


# --- The commands on an imported workdir: import, embed, eval, export, train from it. ---

def _write_images(images: list[np.ndarray], folder: Path) -> Path:
  """The fixture images as PNG files 0.png .. 5.png (list_images keeps this order)."""
  folder.mkdir(parents=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i}.png")
  return folder


def _cli_import(name: str, workdir: Path) -> dict:
  from navit_clip import cli
  assert cli.main(["import", "--from", str(FIXTURES / name), "--workdir", str(workdir)]) == 0
  return json.loads((workdir / "config.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["siglip", "siglip2_naflex"])
def test_embed_texts_of_an_imported_workdir_equal_transformers(tmp_path, inputs, name):
  """The embed command's tokenizer (make_tokenizer) pads as the checkpoint's does."""
  from navit_clip import cli
  _cli_import(name, tmp_path / "work")
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(inputs[1]) + "\n")
  out = tmp_path / "texts"
  assert cli.main(["embed", "--workdir", str(tmp_path / "work"), "--texts", str(captions),
                   "--out", str(out), "--no-progress"]) == 0
  ref = np.load(FIXTURES / name / "reference.npz")
  np.testing.assert_allclose(np.load(f"{out}.npy"), ref["text_embeds_normalized"], atol=TOL,
                             rtol=0)


@pytest.mark.slow
def test_a_moved_imported_workdir_still_embeds_texts_as_transformers(tmp_path, inputs):
  """config.json names the workdir's tokenizer copy relative to the workdir, so moving the
  workdir (the original gone) breaks nothing."""
  from navit_clip import cli
  config = _cli_import("siglip", tmp_path / "work")
  assert config["data"]["tokenizer"]["path"] == "tokenizer.model"
  shutil.move(tmp_path / "work", tmp_path / "moved")
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(inputs[1]) + "\n")
  out = tmp_path / "texts"
  assert cli.main(["embed", "--workdir", str(tmp_path / "moved"), "--texts", str(captions),
                   "--out", str(out), "--no-progress"]) == 0
  ref = np.load(FIXTURES / "siglip" / "reference.npz")
  np.testing.assert_allclose(np.load(f"{out}.npy"), ref["text_embeds_normalized"], atol=TOL,
                             rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name,resolution,budget_key", [
    ("siglip", "", "fixed"),  # the imported default: square:32, bicubic
    ("siglip2", "", "fixed"),
    ("siglip2_naflex", "", "budget64"),  # the imported default: naflex:64
    ("siglip2_naflex", "naflex:24", "budget24"),
])
def test_embed_images_of_an_imported_workdir_equal_transformers(tmp_path, inputs, name,
                                                                resolution, budget_key):
  """From PNG files to embeddings, preprocessed by the policy the import recorded."""
  from navit_clip import cli
  config = _cli_import(name, tmp_path / "work")
  assert config["inference_resolution"] == {"siglip2_naflex": "naflex:64"}.get(name,
                                                                               "square:32")
  images = _write_images(inputs[0], tmp_path / "images")
  out = tmp_path / "images_emb"
  assert cli.main(["embed", "--workdir", str(tmp_path / "work"), "--images", str(images),
                   "--out", str(out), "--no-progress"]
                  + (["--resolution", resolution] if resolution else [])) == 0
  ref = np.load(FIXTURES / name / "reference.npz")
  np.testing.assert_allclose(np.load(f"{out}.npy"), ref[f"{budget_key}/image_embeds_normalized"],
                             atol=TOL, rtol=0)


@pytest.mark.slow
def test_zero_shot_eval_of_an_imported_workdir_uses_its_processor_policy(tmp_path, inputs):
  from navit_clip import cli
  _cli_import("siglip2_naflex", tmp_path / "work")
  classes = tmp_path / "classes"
  for i, image in enumerate(inputs[0]):
    folder = classes / ("wide" if image.shape[1] > image.shape[0] else "narrow")
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f"{i}.png")
  assert cli.main(["eval", "--workdir", str(tmp_path / "work"), "--zeroshot",
                   f"folder:{classes}", "--templates", "clip_short"]) == 0
  report = json.loads((tmp_path / "work" / "eval_step0.json").read_text())
  result = report["evals"]["cli_zeroshot"]
  assert result["resolution"] == "naflex:64"
  assert result["skipped"] == 0


@pytest.mark.slow
def test_export_of_an_imported_workdir_carries_its_tokenizer(tmp_path, inputs):
  from navit_clip import cli
  from navit_clip.serving_export import load_jax_export, load_tokenizer
  _cli_import("siglip", tmp_path / "work")
  assert cli.main(["export", "--workdir", str(tmp_path / "work"), "--out",
                   str(tmp_path / "export")]) == 0
  manifest = json.loads((tmp_path / "export" / "export.json").read_text())
  assert manifest["resolution"] == "square:32"
  assert manifest["platforms"] == ["cpu", "cuda", "tpu"]
  tokens = load_tokenizer(str(tmp_path / "export")).encode(inputs[1])
  ref = np.load(FIXTURES / "siglip" / "reference.npz")
  np.testing.assert_array_equal(tokens, ref["input_ids"])  # EOS-padded, lowercased
  texts = load_jax_export(str(tmp_path / "export" / "text_encoder.jax_export"))
  np.testing.assert_allclose(np.asarray(texts(tokens)), ref["text_embeds_normalized"],
                             atol=TOL, rtol=0)


LIT_RECIPE = '''
from navit_clip.evaluate.restore import load_config


def get_config(workdir):
  """LiT from an imported workdir: its image tower frozen, its text tower trained on."""
  c = load_config(workdir)
  c.init.checkpoint, c.init.params = workdir, "image;text;logit_scale;logit_bias"
  c.optim.lr_mults = "image/.*=0"
  return c
'''


@pytest.mark.slow
def test_a_run_starts_from_an_imported_workdir(tmp_path):
  """config.init reads an imported workdir: two LiT steps from it, the image tower kept."""
  from navit_clip import cli
  _cli_import("siglip2_naflex", tmp_path / "work")
  recipe = tmp_path / "lit_from_import.py"
  recipe.write_text(LIT_RECIPE)
  assert cli.main(["train", "--config", f"{recipe}:{tmp_path / 'work'}", "--workdir",
                   str(tmp_path / "lit"), "--config.data.batch_size=2",
                   "--config.train.total_steps=2", "--config.train.log_every=1",
                   "--config.train.checkpoint_every=2", "--config.train.peak_flops=1e11",
                   "--config.train.tensorboard=false", "--config.optim.warmup_steps=1"]) == 0
  before = restore_model(str(tmp_path / "work")).model
  after = restore_model(str(tmp_path / "lit")).model
  image = [np.asarray(x) for x in jax.tree.leaves(nnx.state(before.image, nnx.Param))]
  image_after = [np.asarray(x) for x in jax.tree.leaves(nnx.state(after.image, nnx.Param))]
  assert all(np.array_equal(a, b) for a, b in zip(image, image_after))
  text = jax.tree.leaves(nnx.state(before.text, nnx.Param))
  text_after = jax.tree.leaves(nnx.state(after.text, nnx.Param))
  assert not all(np.array_equal(a, b) for a, b in zip(text, text_after))


def test_the_import_command_names_a_missing_source(tmp_path, capsys):
  from navit_clip import cli
  assert cli.main(["import", "--from", str(tmp_path / "nowhere"), "--workdir",
                   str(tmp_path / "work")]) == 2
  assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name,edit,policy", [
    ("siglip", {"size": {"height": 48, "width": 48}}, "square:48"),
    ("siglip2_naflex", {"max_num_patches": 24}, "naflex:24"),
])
def test_the_processor_config_sets_the_inference_policy(tmp_path, name, edit, policy):
  src = _copy(name, tmp_path)
  processor = json.loads((src / "preprocessor_config.json").read_text())
  (src / "preprocessor_config.json").write_text(json.dumps(processor | edit))
  assert import_checkpoint(str(src), str(tmp_path / "work")).inference_resolution == policy


def test_without_a_processor_config_the_model_sizes_give_the_policy(tmp_path):
  src = _copy("siglip2", tmp_path)
  (src / "preprocessor_config.json").unlink()
  assert import_checkpoint(str(src), str(tmp_path / "work")).inference_resolution == "square:32"


@pytest.mark.parametrize("name,edit,message", [
    ("siglip", {"resample": 2}, "resample = 2"),
    ("siglip2_naflex", {"resample": 3}, "resample = 3"),
    ("siglip", {"image_mean": [0.485, 0.456, 0.406]}, "image_mean = "),
    ("siglip", {"size": {"shortest_edge": 32}}, "size = "),
    ("siglip2_naflex", {"patch_size": 16}, "patch_size = 16"),
])
def test_a_processor_that_prepares_pixels_otherwise_is_named(tmp_path, name, edit, message):
  src = _copy(name, tmp_path)
  processor = json.loads((src / "preprocessor_config.json").read_text())
  (src / "preprocessor_config.json").write_text(json.dumps(processor | edit))
  with pytest.raises(UserError, match=message):
    import_checkpoint(str(src), str(tmp_path / "work"))


def test_the_tokenizer_pad_id_is_the_models_own_unless_set(tmp_path):
  from navit_clip.data.pipeline import make_tokenizer
  config = import_checkpoint(str(FIXTURES / "siglip"), str(tmp_path / "work"))
  assert make_tokenizer(config).pad_id == 1  # SigLIP pads with EOS
  config.data.tokenizer.pad_id = -1
  assert make_tokenizer(config).pad_id == 0  # the SentencePiece model's pad piece
  config.data.tokenizer.pad_id = -2
  with pytest.raises(ValueError, match=r"config\.data\.tokenizer\.pad_id = -2 must be >= -1"):
    config_lib.validate(config)


def test_a_model_id_is_read_through_the_hub_cache(tmp_path, monkeypatch):
  """With huggingface_hub (a stand-in here: no network in tests) an id names a snapshot."""
  asked = []

  def snapshot_download(model_id, allow_patterns):
    asked.append((model_id, sorted(allow_patterns)))
    return str(FIXTURES / "siglip2")

  monkeypatch.setitem(sys.modules, "huggingface_hub",
                      types.SimpleNamespace(snapshot_download=snapshot_download))
  config = import_checkpoint("google/siglip2-tiny", str(tmp_path / "work"))
  assert config.inference_resolution == "square:32"
  assert asked[0][0] == "google/siglip2-tiny" and "model.safetensors" in asked[0][1]


def test_a_model_id_without_huggingface_hub_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # its import raises ImportError
  with pytest.raises(MissingInputError, match="install huggingface_hub"):
    import_checkpoint("google/siglip2-tiny", str(tmp_path / "work"))


# --- big_vision .npz releases: the fixtures' weights in big_vision's layout. ---
# make_big_vision_fixtures.py wrote each folder's big_vision.npz from its model.safetensors
# (siglip/: one entry per block; siglip2/, siglip2_naflex/: scanned blocks).

def _big_vision(name: str) -> Path:
  return FIXTURES / name / "big_vision.npz"


@pytest.fixture(scope="module")
def imported_big_vision(tmp_path_factory):
  """name -> (restored model, its config, reference outputs), imported from the .npz."""
  out = {}
  for name in NAMES:
    workdir = tmp_path_factory.mktemp(f"big_vision_{name}")
    import_checkpoint(str(_big_vision(name)), str(workdir))  # the tokenizer lies beside it
    restored = restore_model(str(workdir))
    out[name] = (restored.model, restored.config, dict(np.load(FIXTURES / name / "reference.npz")))
  return out


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_big_vision_npz_embeds_as_transformers_packed_at_every_slot(imported_big_vision,
                                                                      inputs, name):
  model, _, ref = imported_big_vision[name]
  images, _ = inputs
  ztxt = nnx.jit(lambda m, t: m.embed_texts(t))(model, ref["input_ids"])
  np.testing.assert_allclose(np.asarray(ztxt), ref["text_embeds_normalized"], atol=TOL, rtol=0)
  for budget_key in BUDGETS[name]:
    emb, zimg = _packed_embeddings(model, name, budget_key, images, ref)
    np.testing.assert_allclose(emb, _slot_reference(ref[f"{budget_key}/image_embeds"]),
                               atol=TOL, rtol=0)
    logits = (jnp.exp(model.logit_scale[...]) * jnp.einsum("rkd,td->rkt", zimg, ztxt)
              + model.logit_bias[...])
    np.testing.assert_allclose(np.asarray(logits),
                               _slot_reference(ref[f"{budget_key}/logits_per_image"]),
                               atol=TOL, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_a_big_vision_import_configures_what_the_transformers_one_does(imported_big_vision,
                                                                       imported, name):
  """Towers from the tensors' shapes; policy, and padding (EOS for SigLIP's T5 tokenizer,
  <pad> for SigLIP 2's Gemma one), as the transformers release of the same weights."""
  _, config, _ = imported_big_vision[name]
  _, want, _ = imported[name]
  assert config.model.to_dict() == want.model.to_dict()
  assert config.inference_resolution == want.inference_resolution
  assert config.data.seq_len == want.data.seq_len
  assert config.data.tokenizer.pad_id == want.data.tokenizer.pad_id
  assert config.data.tokenizer.lowercase


def test_the_import_command_reads_a_big_vision_npz_with_a_given_tokenizer(tmp_path):
  from navit_clip import cli
  shutil.copy(_big_vision("siglip2_naflex"), tmp_path / "siglip2_b16_naflex.npz")
  tokenizer = FIXTURES / "siglip2_naflex" / "tokenizer.model"
  assert cli.main(["import", "--from", str(tmp_path / "siglip2_b16_naflex.npz"), "--tokenizer",
                   str(tokenizer), "--workdir", str(tmp_path / "work")]) == 0
  config = json.loads((tmp_path / "work" / "config.json").read_text())
  assert config["inference_resolution"] == "naflex:64"
  assert (tmp_path / "work" / "tokenizer.model").read_bytes() == tokenizer.read_bytes()


def _edited_npz(tmp_path: Path, name: str, edit) -> Path:
  """A copy of `name`'s big_vision.npz with `edit(arrays)` applied, beside its tokenizer."""
  src = _copy(name, tmp_path)
  arrays = dict(np.load(src / "big_vision.npz"))
  edit(arrays)
  np.savez(src / "big_vision.npz", **arrays)
  return src / "big_vision.npz"


@pytest.mark.parametrize("name,edit,message", [
    ("siglip", lambda a: a.pop("params/img/MAPHead_0/probe"),
     "'params/img/MAPHead_0/probe' is missing"),
    ("siglip", lambda a: a.update({"params/img/head/kernel": np.zeros((32, 8), np.float32)}),
     "1 tensors that the model has no place for: params/img/head/kernel"),
    ("siglip", lambda a: a.update({"params/b": np.zeros(2, np.float32)}),
     "'params/b' has shape"),
    ("siglip2", lambda a: a.update({"params/txt/Encoder_0/encoderblock/LayerNorm_1/bias":
                                    np.zeros((2, 5), np.float32)}),
     r"'params/txt/Encoder_0/encoderblock\[0\]/LayerNorm_1/bias' has shape \[5\]"),
    ("siglip2", lambda a: a.update({"params/txt/head/kernel": np.zeros((24, 16), np.float32)}),
     "projects to 16, not the image tower's width 32"),
    ("siglip2_naflex", lambda a: a.update({"params/img/pos_embedding":
                                           np.zeros((1, 64, 32), np.float32)}),
     "neither a vit.py"),
])
def test_a_missing_extra_or_misshapen_big_vision_tensor_is_named(tmp_path, name, edit, message):
  path = _edited_npz(tmp_path, name, edit)
  with pytest.raises(UserError, match=message):
    import_checkpoint(str(path), str(tmp_path / "work"))


def test_a_npz_that_is_no_big_vision_checkpoint_or_lacks_a_tokenizer_is_named(tmp_path):
  np.savez(tmp_path / "other.npz", weights=np.zeros(3, np.float32))
  with pytest.raises(UserError, match="no big_vision two_towers image tower"):
    import_checkpoint(str(tmp_path / "other.npz"), str(tmp_path / "work"))
  shutil.copy(_big_vision("siglip"), tmp_path / "alone.npz")
  with pytest.raises(UserError, match="has no tokenizer in it; give its SentencePiece model"):
    import_checkpoint(str(tmp_path / "alone.npz"), str(tmp_path / "work"))
  with pytest.raises(UserError, match="brings its own tokenizer"):
    import_checkpoint(str(FIXTURES / "siglip"), str(tmp_path / "work"),
                      tokenizer=str(FIXTURES / "siglip" / "spiece.model"))


def test_bfloat16_big_vision_arrays_are_read_as_bfloat16(tmp_path):
  """np.savez stores bfloat16 as 2-byte void; its values come back exactly, widened."""
  halves = {k: v.astype(ml_dtypes.bfloat16) for k, v in np.load(_big_vision("siglip2")).items()}
  np.savez(tmp_path / "bf16.npz", **halves)
  ckpt = big_vision_siglip.load(str(tmp_path / "bf16.npz"))
  params = big_vision_siglip.read_params(ckpt, big_vision_siglip.read_architecture(ckpt))
  want = halves["params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"][1]
  got = params["image"]["encoder"]["blocks"][1]["mlp"]["fc1"]["kernel"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want.astype(np.float32))
