"""Embedding in packed rows, embedding export to files, and model export round trips."""

import json
import os

import numpy as np
import pytest
from flax import nnx
from PIL import Image

from navit_clip.data.sources.demo import DemoSource
from navit_clip.evaluate.embedder import Embedder, embed_packed
from navit_clip.evaluate.inference_batches import inference_batches
from navit_clip.evaluate.inference_resolution import ResolutionPolicy, inference_spec
from navit_clip.embedding_writer import export_image_embeddings, run_chunks
from navit_clip.serving_export import IMAGE_INPUTS, export_model, load_jax_export
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
  tokens = np.random.default_rng(0).integers(0, 60, (5, config.model.text.max_len), np.int32)
  texts = load_jax_export(str(tmp_path / "text_encoder.jax_export"))
  np.testing.assert_allclose(np.asarray(texts(tokens)), embedder.texts(tokens), atol=1e-5)


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
