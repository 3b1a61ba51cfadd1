"""Embedding in packed rows, embedding export to files, and model export round trips."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from navit_clip.data.sources.demo import DemoSource
from navit_clip.evaluate.embedder import Embedder, embed_packed
from navit_clip.evaluate.inference_batches import inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec
from navit_clip.embedding_writer import export_image_embeddings, run_chunks
from navit_clip.data.pipeline import make_tokenizer
from navit_clip.serving_export import IMAGE_INPUTS, export_model, load_jax_export, load_tokenizer
from navit_clip.model import build_model


class _Records:
  """A list of records as a random-access source."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[int(i)]


@pytest.fixture(scope="module")
def tiny(demo_tokenizer_path):
  from conftest import tiny_demo_config
  config = tiny_demo_config(demo_tokenizer_path)
  return config, build_model(config, rngs=nnx.Rngs(0))


def _embed(embedder, config, records, policy, **shape):
  spec = inference_spec(config, policy, **shape)
  sampler = policy.sampler(spec.patch_size, spec.seq_len, 2.0)
  return embed_packed(embedder, inference_batches(_Records(records), spec, sampler))


@pytest.mark.parametrize("policy", ["budget:48", "native"])
def test_embedding_alone_equals_embedding_among_100_mixed_images(tiny, policy):
  config, model = tiny
  embedder = Embedder(model)
  demo = DemoSource("eval", num_examples=100, min_side=16, max_side=96, max_aspect=4.0)
  records = [demo[i] for i in range(100)]
  sizes = {r["image"].shape[:2] for r in records}
  assert len(sizes) > 50  # mixed sizes and aspect ratios
  policy = ResolutionPolicy.parse(policy)
  crowd = _embed(embedder, config, records, policy, batch_size=4, seq_len=128, max_images=12)
  assert len(crowd["example_id"]) == 100
  for k in (0, 37, 99):
    alone = _embed(embedder, config, [records[k]], policy, batch_size=1, seq_len=128,
                   max_images=1)
    np.testing.assert_allclose(alone["embedding"][0], crowd["embedding"][k], atol=2e-6)


def test_image_export_is_in_order_lists_bad_files_and_resumes(tiny, tmp_path):
  config, model = tiny
  paths = []
  for i in range(7):
    path = tmp_path / "imgs" / f"{i}.png"
    path.parent.mkdir(exist_ok=True)
    size = (12 + 9 * i, 40 - 3 * i)
    Image.fromarray(np.full((*size, 3), 30 * i, np.uint8)).save(path)
    paths.append(str(path))
  (tmp_path / "imgs" / "3.png").write_bytes(b"not an image")
  from navit_clip.evaluate.files import ImageFiles, list_images
  source = ImageFiles(list_images(str(tmp_path / "imgs")))
  out = str(tmp_path / "emb")
  summary = export_image_embeddings(Embedder(model), config, source, out,
                                    policy=ResolutionPolicy.parse("budget:16"),
                                    dtype="float16", chunk=3, progress=False)
  assert summary["rows"] == 6 and summary["skipped"] == 1
  emb = np.load(out + ".npy")
  assert emb.dtype == np.float16 and emb.shape == (6, 32)
  meta = [json.loads(x) for x in open(out + ".jsonl")]
  assert [m["path"] for m in meta] == [p for p in paths if not p.endswith("3.png")]
  skipped = [json.loads(x) for x in open(out + ".skipped.jsonl")]
  assert skipped == [{"index": 3, "path": paths[3], "reason": "not_an_image"}]
  assert not os.path.exists(out + ".parts")
  # Each image embedded alone gives the same row (packing does not change embeddings).
  alone = Embedder(model)
  one = export_image_embeddings(alone, config, ImageFiles([paths[5]]), str(tmp_path / "one"),
                                policy=ResolutionPolicy.parse("budget:16"), progress=False)
  assert one["rows"] == 1
  np.testing.assert_allclose(np.load(str(tmp_path / "one.npy"))[0], emb[4], atol=2e-3)


def test_run_chunks_resumes_after_an_interruption(tmp_path):
  calls = []

  def compute(start, stop):
    calls.append(start)
    if start == 4 and len(calls) == 2:
      raise KeyboardInterrupt
    return (np.arange(start, stop, dtype=np.float32)[:, None].repeat(2, 1),
            [{"index": i} for i in range(start, stop)], [])

  out = str(tmp_path / "x")
  with pytest.raises(KeyboardInterrupt):
    run_chunks(10, compute, out, chunk=4)
  run_chunks(10, compute, out, chunk=4)
  assert calls == [0, 4, 4, 8]  # chunk 0 was not computed again
  np.testing.assert_array_equal(np.load(out + ".npy")[:, 0], np.arange(10))


def test_jax_export_round_trips(tiny, tmp_path):
  config, model = tiny
  embedder = Embedder(model)
  policy = ResolutionPolicy.parse("budget:32")
  spec = inference_spec(config, policy, batch_size=2)
  manifest = export_model(model, spec, config.model.text.max_len, str(tmp_path))
  assert manifest["embedding_dim"] == 32
  batch = next(inference_batches(DemoSource("eval", num_examples=6), spec,
                                 policy.sampler(spec.patch_size, spec.seq_len, 2.0)))
  images = load_jax_export(str(tmp_path / "image_encoder.jax_export"))
  got = np.asarray(images({k: batch[k] for k in IMAGE_INPUTS}))
  np.testing.assert_allclose(got, embedder.images(batch), atol=1e-5)
  texts = load_jax_export(str(tmp_path / "text_encoder.jax_export"))
  for n in (5, 2):  # one export, any text batch size
    tokens = np.random.default_rng(n).integers(0, 60, (n, config.model.text.max_len), np.int32)
    np.testing.assert_allclose(np.asarray(texts(tokens)), embedder.texts(tokens), atol=1e-5)


def test_jax_export_serves_every_platform_and_carries_the_tokenizer(tiny, tmp_path):
  config, model = tiny
  tokenizer = make_tokenizer(config)
  spec = inference_spec(config, ResolutionPolicy.parse("budget:32"), batch_size=2)
  manifest = export_model(model, spec, config.model.text.max_len, str(tmp_path),
                          tokenizer=tokenizer, resolution="budget:32")
  written = json.loads((tmp_path / "export.json").read_text())
  assert written["platforms"] == ["cpu", "cuda", "tpu"] == manifest["platforms"]
  assert written["resolution"] == "budget:32"
  for name in ("image_encoder.jax_export", "text_encoder.jax_export"):
    exported = jax.export.deserialize(bytearray((tmp_path / name).read_bytes()))
    assert exported.platforms == ("cpu", "cuda", "tpu")
  assert (tmp_path / written["tokenizer"]["file"]).is_file()
  assert written["tokenizer"]["file"] in written["files"]
  captions = ["a small red circle on a wide blue background", "a big green star"]
  served = load_tokenizer(str(tmp_path))
  np.testing.assert_array_equal(served.encode(captions), tokenizer.encode(captions))
  texts = load_jax_export(str(tmp_path / "text_encoder.jax_export"))
  np.testing.assert_allclose(np.asarray(texts(served.encode(captions))),
                             Embedder(model).texts(tokenizer.encode(captions)), atol=1e-5)


@pytest.mark.slow
def test_tf_saved_model_round_trips(tiny, tmp_path):
  tf = pytest.importorskip("tensorflow")
  config, model = tiny
  embedder = Embedder(model)
  policy = ResolutionPolicy.parse("budget:32")
  spec = inference_spec(config, policy, batch_size=2)
  export_model(model, spec, config.model.text.max_len, str(tmp_path), tf=True, text_batch=4)
  loaded = tf.saved_model.load(str(tmp_path / "saved_model"))
  batch = next(inference_batches(DemoSource("eval", num_examples=6), spec,
                                 policy.sampler(spec.patch_size, spec.seq_len, 2.0)))
  out = loaded.signatures["embed_images"](**{k: tf.constant(batch[k]) for k in IMAGE_INPUTS})
  np.testing.assert_allclose(out["embeddings"].numpy(), embedder.images(batch), atol=1e-5)
  tokens = np.random.default_rng(0).integers(0, 60, (4, config.model.text.max_len), np.int32)
  out = loaded.signatures["embed_texts"](tokens=tf.constant(tokens))
  np.testing.assert_allclose(out["embeddings"].numpy(), embedder.texts(tokens), atol=1e-5)


def test_square_policy_squashes_bicubic_and_drops_what_a_strided_conv_ignores():
  """square:36 at patch 8: SigLIP's processor resizes to 36 x 36 (bicubic), and its
  stride-8 convolution reads the first 32 rows and columns."""
  from navit_clip.data.patchify import patchify
  from navit_clip.data.preprocess import Preprocessor
  from navit_clip.data.token_drop import TokenDropper
  policy = ResolutionPolicy.parse("square:36")
  assert (policy.resample, policy.draft, policy.min_seq_len(8)) == ("bicubic", False, 16)
  image = np.random.default_rng(0).integers(0, 256, (50, 20, 3), np.uint8)
  preprocess = Preprocessor(patch_size=8, sampler=policy.sampler(8, 64, 2.0),
                            dropper=TokenDropper(kind="none"), seed=0,
                            resample=policy.resample, draft=policy.draft)
  example = preprocess(0, {"image": image, "example_id": 0})
  squashed = np.asarray(Image.fromarray(image).resize((36, 36), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(example["patches"], patchify(squashed[:32, :32], 8)[0])
  np.testing.assert_array_equal(example["grid_hw"], [4, 4])


def test_naflex_policy_gives_the_naflex_sizes_and_rows_that_hold_them():
  from navit_clip.data.resolution_sampling import naflex_size
  policy = ResolutionPolicy.parse("naflex:24")
  sampler = policy.sampler(4, 24, 2.0)
  for h, w in ((8, 40), (40, 8), (33, 33), (500, 375)):
    assert sampler.sample(None, h, w) == (*naflex_size(h, w, 4, 24), False)
  shrunk = policy.sampler(4, 10, 2.0).sample(None, 40, 40)
  assert shrunk == (*naflex_size(40, 40, 4, 10), True)
  assert (policy.resample, policy.draft, policy.min_seq_len(4)) == ("bilinear", False, 24)


def test_a_square_policy_larger_than_the_row_and_a_bad_policy_are_named(tiny):
  from navit_clip.config import validate
  with pytest.raises(ValueError, match="square:32 gives 4 x 4 patches"):
    ResolutionPolicy.parse("square:32").sampler(8, 8, 2.0)
  config = tiny[0].copy_and_resolve_references()
  config.inference_resolution = "square"
  with pytest.raises(ValueError, match="config.inference_resolution = 'square'"):
    validate(config)
