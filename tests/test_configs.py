"""Every recipe in configs/ validates, builds abstractly, and has the expected size."""

import jax
import numpy as np
import pytest
from flax import nnx

from navit_clip import config as config_lib
from navit_clip.attention import CHOICES as ATTENTION_CHOICES
from navit_clip.config_loading import apply_overrides, load_config
from navit_clip.model import build_model
from navit_clip.optim import flatten_names, make_optimizer

RECIPES = ["demo", "demo_classification", "siglip_navit_b16", "clip_navit_b16",
           "siglip_navit_so400m14", "jft_navit_b16", "lit_navit_b16"]


def _param_counts(config) -> dict[str, int]:
  """Parameter count per top-level submodule, without allocating any parameter memory."""
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  counts = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    top = str(path[0].key)
    counts[top] = counts.get(top, 0) + leaf.size
  return counts


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates(name):
  config_lib.validate(load_config(name))


@pytest.mark.parametrize("name, image_millions, text_millions", [
    ("siglip_navit_b16", (86, 95), (100, 115)),  # ViT-B/16 86M + MAP head; B text, 32k vocab
    ("siglip_navit_so400m14", (400, 440), (420, 460)),
])
def test_large_recipe_sizes(name, image_millions, text_millions):
  counts = _param_counts(load_config(name))
  image, text = counts["image"] / 1e6, counts["text"] / 1e6
  assert image_millions[0] <= image <= image_millions[1], image
  assert text_millions[0] <= text <= text_millions[1], text


def test_jft_recipe_size():
  counts = _param_counts(load_config("jft_navit_b16"))
  assert 86 <= counts["image"] / 1e6 <= 95
  assert counts["head"] == 768 * 29_593 + 29_593


def test_jft_recipe_decays_the_head_100x_the_body():
  c = load_config("jft_navit_b16")
  c.model.image.update(variant="mu/8", dtype="float32", remat="none", scan_layers=False)
  c.model.num_classes = 5
  c.optim.warmup_steps = 0
  params = nnx.to_pure_dict(nnx.state(build_model(c, rngs=nnx.Rngs(0)), nnx.Param))
  params["head"]["kernel"] = jax.numpy.ones_like(params["head"]["kernel"])  # zeros at init
  tx = make_optimizer(c.optim, params, c.train.total_steps)
  zero = jax.tree.map(jax.numpy.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)  # only the weight decay moves
  lr_wd = c.optim.lr * c.optim.weight_decay
  names = flatten_names(params)
  for n, p, u in zip(jax.tree.leaves(names), jax.tree.leaves(params),
                     jax.tree.leaves(updates)):
    mult = 100.0 if n == "head/kernel" else 1.0 if n.endswith("kernel") else 0.0
    np.testing.assert_allclose(u, -lr_wd * mult * p, rtol=1e-5, atol=1e-12, err_msg=n)


def _abstract_params(config):
  model = nnx.eval_shape(lambda: build_model(config, rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _image_shapes(params) -> dict[str, tuple[int, ...]]:
  return {n: x.shape for n, x in zip(jax.tree.leaves(flatten_names(params)),
                                      jax.tree.leaves(params)) if n.startswith("image/")}


def test_lit_recipe_reads_the_jft_image_tower_and_freezes_it():
  lit = load_config("lit_navit_b16:/runs/jft")
  config_lib.validate(lit)
  assert lit.init.checkpoint == "/runs/jft" and lit.init.params == "image"
  lit_params = _abstract_params(lit)
  assert _image_shapes(lit_params) == _image_shapes(_abstract_params(load_config("jft_navit_b16")))
  make_optimizer(lit.optim, lit_params, lit.train.total_steps)  # every lr_mults regex matches


def test_overrides_are_typed_and_named():
  c = load_config("demo")
  apply_overrides(c, ["optim.lr=0.5", "model.image.variant=S/16", "train.total_steps=7",
                      "model.image.qk_norm=false"])
  assert c.optim.lr == 0.5 and c.model.image.variant == "S/16"
  assert c.train.total_steps == 7 and c.model.image.qk_norm is False
  with pytest.raises(ValueError, match="optim.nope"):
    apply_overrides(c, ["optim.nope=1"])
  with pytest.raises(ValueError, match="train.total_steps"):
    apply_overrides(c, ["train.total_steps=many"])


def test_unknown_recipe_lists_known_ones():
  with pytest.raises(ValueError, match="known: .*demo"):
    load_config("no_such_recipe")


def test_validate_names_the_bad_key():
  c = load_config("demo")
  c.model.image.posemb = "rotary"
  with pytest.raises(ValueError, match="model.image.posemb"):
    config_lib.validate(c)


def test_every_attention_choice_validates():
  c = load_config("demo")
  for backend in ATTENTION_CHOICES:
    c.model.image.attention = backend
    config_lib.validate(c)
  c.model.image.attention = "flash"
  with pytest.raises(ValueError, match="model.image.attention"):
    config_lib.validate(c)


# One bad value per section: validate reaches the check_config of the module that reads the
# section, and the error names the full key.
BAD_VALUES = [
    ("model.image.variant", "B", r"config\.model\.image\.variant = 'B' needs a patch size"),
    ("model.image.posemb", "rotary", r"config\.model\.image\.posemb = 'rotary'; expected one of"),
    ("model.image.dtype", "float16", r"config\.model\.image\.dtype = 'float16'; expected one"),
    ("model.image.remat", "some", r"config\.model\.image\.remat = 'some'; expected one of"),
    ("model.text.variant", "B/16", r"config\.model\.text\.variant = 'B/16' names a patch size"),
    ("model.text.pool", "first", r"config\.model\.text\.pool = 'first'; expected one of"),
    ("model.text.eos_id", 200, r"config\.model\.text\.eos_id = 200 must be in \[0, config\.model"),
    ("task", "regression", r"config\.task = 'regression'; expected one of"),
    ("data.max_images", 300, r"config\.data\.max_images = 300 must be in \[1, config\.data\."),
    ("data.read_threads", -1, r"config\.data\.read_threads = -1 must be"),
    ("data.source", "parquet", r"config\.data\.source = 'parquet'; expected one of"),
    ("data.caption_repair", "drop", r"config\.data\.caption_repair = 'drop'; expected one of"),
    ("data.max_bad_fraction", 0.0, r"config\.data\.max_bad_fraction = 0\.0 must be in \(0\.0,"),
    ("data.decode.mislabelled", "fix", r"config\.data\.decode\.mislabelled = 'fix'; expected"),
    ("data.resolution.kind", "area", r"config\.data\.resolution\.kind = 'area'; expected one"),
    ("data.token_drop.rate", 1.0, r"config\.data\.token_drop\.rate = 1\.0 must be in \[0\.0,"),
    ("data.packer", "greedy", r"config\.data\.packer = 'greedy'; expected one of"),
    ("loss.name", "hinge", r"config\.loss\.name = 'hinge'; expected one of"),
    ("loss.init_t", 0.0, r"config\.loss\.init_t = 0\.0 must be > 0\.0"),
    ("loss.max_t", 5.0, r"config\.loss\.max_t = 5\.0 is below the initial temperature t = 10"),
    ("optim.grad_accum", "scan", r"config\.optim\.grad_accum = 'scan'; expected one of"),
    ("optim.wd_mults", "head/.*=-1", r"config\.optim\.wd_mults = 'head/\.\*=-1': .*>= 0"),
    ("optim.schedule", "step", r"config\.optim\.schedule = 'step'; expected one of"),
    ("optim.lr_mults", "image/.*=x", r"config\.optim\.lr_mults = 'image/\.\*=x': .*multiplier"),
    ("mesh", "data:2,pipe:2", r"config\.mesh = 'data:2,pipe:2': "),
    ("sharding.fsdp_min_size", -1, r"config\.sharding\.fsdp_min_size = -1 must be >= 0"),
    ("distributed.initialize", "maybe", r"config\.distributed\.initialize = 'maybe'; expected"),
    ("train.log_every", 0, r"config\.train\.log_every = 0 must be >= 1"),
    ("train.nonfinite", "ignore", r"config\.train\.nonfinite = 'ignore'; expected one of"),
    ("init.step", -2, r"config\.init\.step = -2 must be >= -1"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES, ids=[k for k, _, _ in BAD_VALUES])
def test_each_section_checks_its_keys(key, value, message):
  c = load_config("demo")
  *parents, leaf = key.split(".")
  section = c
  for part in parents:
    section = section[part]
  section[leaf] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_evaluators_and_init_params_are_checked_by_their_modules():
  c = load_config("demo")
  c.evals.sweep = config_lib.eval_config("resolutions", "demo:shape", budgets="64,lots")
  with pytest.raises(ValueError, match=r"config\.evals\.sweep\.budgets = '64,lots': "):
    config_lib.validate(c)
  c = load_config("demo")
  c.init.checkpoint, c.init.params = "/runs/jft", ""
  with pytest.raises(ValueError, match=r"config\.init\.params = '' names no parameters"):
    config_lib.validate(c)
