"""The Grain pipeline over real formats: exactly once, worker-count independence, resume,
multi-host shards, mixtures, per-epoch caption choice."""

import dataclasses
import os

import grain
import numpy as np
import pytest

from data_fixtures import jpeg, tfrecord_files, webdataset_shards
from navit_clip.config import validate
from navit_clip.data import pack_dataset, pipeline
from navit_clip.data.convert import convert
from navit_clip.data.counters import data_counters
from navit_clip.data.pack_dataset import from_transfer
from navit_clip.data.resolution_sampling import ResolutionSampler
from navit_clip.data.shared_blocks import BlockReader
from navit_clip.data.sources.stream import ID_MIXTURE_SHIFT
from navit_clip.evaluate.inference_batches import inference_batches


@pytest.fixture(autouse=True)
def _absl_flags_parsed():
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture
def config(tiny_config):
  c = tiny_config()
  c.data.num_epochs = 1
  c.data.shuffle_window = 4
  c.data.cycle_length = 2
  c.data.shard_by_process = False
  c.data.resolution.min_side = 16
  return c


@pytest.fixture
def wds(tmp_path):
  return webdataset_shards(str(tmp_path), num_shards=3, per_shard=6)


def _ids(batches):
  return [i for b in batches for i in b["example_id"][b["image_mask"]].tolist()]


def _batches(config, **kwargs):
  it = iter(pipeline.make_train_dataset(config, **kwargs))
  return list(it), it


def _same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_every_source_validates_and_an_unknown_one_is_named(config):
  config.data.train_files, config.data.mixture = "shards/*.tar", "webdataset:shards/*.tar=1"
  for source in pipeline.SOURCES:
    config.data.source = source
    validate(config)
  config.data.source = "parquet"
  with pytest.raises(ValueError, match=r"config.data.source = 'parquet'; expected one of"):
    validate(config)


def test_webdataset_epoch_exactly_once_and_independent_of_workers(config, wds):
  pattern, captions = wds
  config.data.source, config.data.train_files = "webdataset", pattern
  validate(config)
  batches0, it = _batches(config)
  assert sorted(_ids(batches0)) == sorted(captions)
  assert data_counters(it) == {"records": 18, "skipped": 0}
  config.data.num_workers, config.data.stream_split = 2, "records"
  batches2, it2 = _batches(config)
  _same(batches0, batches2)
  assert data_counters(it2) == {"records": 18, "skipped": 0}


@pytest.mark.slow
def test_workers_reading_their_own_files_cover_the_epoch_once_and_resume_exactly(config,
                                                                                wds):
  """stream_split "files" (the "auto" choice with a shard a worker): each record once per
  epoch, the same batches for the same seed, and a resume inside a group continues them."""
  pattern, captions = wds
  config.data.source, config.data.train_files = "webdataset", pattern
  config.data.num_workers, config.data.num_epochs, config.data.batch_size = 2, 2, 2
  config.data.packer, config.data.pack_bins = "first_fit", 1
  full, it = _batches(config)
  assert sorted(_ids(full)) == sorted(list(captions) * 2)
  assert data_counters(it) == {"records": 36, "skipped": 0}
  config.data.stream_split = "files"
  again = iter(pipeline.make_train_dataset(config))
  states = []
  for _ in full:
    states.append(again.get_state())
    next(again)
  k = next(k for k, s in enumerate(states) if s["anchor_key"] % pipeline.TRANSFER_GROUP)
  resumed = iter(pipeline.make_train_dataset(config))
  resumed.set_state(states[k])
  _same(full[k:], list(resumed))
  config.data.stream_split = "records"
  assert sorted(_ids(_batches(config)[0])) == sorted(_ids(full))  # another order


def test_a_files_split_needs_a_file_for_each_worker(config, wds):
  config.data.source, config.data.train_files = "webdataset", wds[0]
  records = pipeline.make_records(config, seed=0)
  assert pipeline.stream_split(records, "auto", 3) == "files"
  assert pipeline.stream_split(records, "auto", 4) == "records"  # 3 shards
  with pytest.raises(ValueError, match="stream_split = 'files': a stream has 3 files for 4"):
    pipeline.stream_split(records, "files", 4)
  config.data.source, config.data.mixture = "mixture", f"webdataset:{wds[0]}=1;demo:=1"
  mixed = pipeline.make_records(config, seed=0)
  assert pipeline.stream_split(mixed, "auto", 2) == "records"


@pytest.mark.parametrize("packer", ["best_fit", "grain_first_fit"])
def test_every_packer_reports_the_counters_of_its_stream(config, wds, packer):
  config.data.source, config.data.train_files = "webdataset", wds[0]
  config.data.packer = packer
  batches, it = _batches(config)
  assert sorted(_ids(batches)) == sorted(wds[1])
  assert data_counters(it) == {"records": 18, "skipped": 0}
  assert data_counters(iter(batches)) == {}  # an iterator without counters


def test_arrayrecord_epoch_exactly_once_and_independent_of_workers(config, wds, tmp_path):
  pattern, captions = wds
  config.data.source, config.data.train_files = "webdataset", pattern
  counts = convert(config, str(tmp_path / "ar"), records_per_shard=5, progress=False,
                   log=lambda _: None)
  assert counts == {"records": 18, "written": 18}
  config.data.source, config.data.train_files = "arrayrecord", str(tmp_path / "ar/*.array_record")
  batches0, _ = _batches(config)
  assert sorted(_ids(batches0)) == sorted(captions)
  config.data.num_workers = 2
  _same(batches0, _batches(config)[0])


def test_convert_resumes_and_skips_written_shards(config, wds, tmp_path):
  config.data.source, config.data.train_files = "webdataset", wds[0]
  out = tmp_path / "ar"
  convert(config, str(out), progress=False, log=lambda _: None)
  first = sorted(p.name for p in out.glob("*.array_record"))
  assert len(first) == 3 and (out / "convert.json").exists()
  (out / first[0]).unlink()
  messages = []
  counts = convert(config, str(out), progress=False, log=messages.append)
  assert counts == {"records": 6, "written": 6}  # only the missing shard
  assert "2 of 3 shards already written" in messages[0]
  assert sorted(p.name for p in out.glob("*.array_record")) == first


@pytest.mark.parametrize("source", ["webdataset", "demo", "mixture"])
def test_same_seed_same_batches_and_exact_resume(config, wds, source):
  config.data.num_epochs = 2
  config.data.batch_size = 2
  config.data.source = source
  config.data.train_files = wds[0]
  config.data.num_train_examples = 20
  config.data.mixture = f"webdataset:{wds[0]}=0.6;demo:=0.4"
  full = list(pipeline.make_train_dataset(config))
  assert len(full) >= 4
  again = list(pipeline.make_train_dataset(config))
  _same(full, again)
  for k in (1, len(full) // 2, len(full) - 1):
    it = iter(pipeline.make_train_dataset(config))
    for _ in range(k):
      next(it)
    state = it.get_state()
    counters = data_counters(it)
    resumed = iter(pipeline.make_train_dataset(config))
    resumed.set_state(state)
    assert data_counters(resumed) == counters
    _same(full[k:], list(resumed))


def test_read_threads_follow_the_config_and_leave_the_batches_as_they_are(config,
                                                                         monkeypatch):
  threads = []
  to_iter = grain.MapDataset.to_iter_dataset

  def recording(self, read_options=None, **kwargs):
    threads.append(read_options.num_threads if read_options else None)
    return to_iter(self, read_options, **kwargs)

  monkeypatch.setattr(grain.MapDataset, "to_iter_dataset", recording)
  config.data.source, config.data.num_train_examples = "demo", 30
  batches = {}
  for requested in (1, 4, 0):
    config.data.read_threads = requested
    batches[requested] = list(pipeline.make_train_dataset(config))
  assert threads == [1, 4, min(os.cpu_count(), 16)]  # 0: the host's cores, not Grain's 16
  _same(batches[1], batches[4])
  _same(batches[1], batches[0])
  threads.clear()
  spec = dataclasses.replace(pipeline.batch_spec(config), text_len=None)
  sampler = ResolutionSampler.from_config(config.data.resolution, spec.patch_size,
                                          spec.seq_len)
  list(inference_batches(pipeline.make_source(config, "eval"), spec, sampler))
  assert threads == [min(os.cpu_count(), 16)]  # evaluation and embedding read alike


@pytest.mark.slow
@pytest.mark.parametrize("source", ["demo", "webdataset"])
def test_workers_send_groups_and_resume_exactly_inside_one(config, wds, monkeypatch, source):
  """Random-access and streamed records reach the main process TRANSFER_GROUP at a time:
  the batches of zero workers, and a resume from a state taken inside a group yields the
  unbroken rest."""
  config.data.source, config.data.num_train_examples = source, 30
  config.data.train_files = wds[0]  # 18 records
  config.data.batch_size, config.data.num_epochs = 2, 1
  config.data.packer, config.data.pack_bins = "first_fit", 1  # anchors move every batch
  full = list(pipeline.make_train_dataset(config))
  config.data.num_workers, config.data.stream_split = 2, "records"  # the in-process order
  transfers = []
  monkeypatch.setattr(pack_dataset, "from_transfer",
                      lambda t, *a: transfers.append(t) or from_transfer(t, *a))
  it = iter(pipeline.make_train_dataset(config))
  states, batches = [], []
  for _ in full:
    states.append(it.get_state())
    batches.append(next(it))
  _same(full, batches)
  records = 30 if source == "demo" else 18
  assert len(transfers) == -(-records // pipeline.TRANSFER_GROUP)  # groups, not examples
  inside = [k for k, s in enumerate(states) if s["anchor_key"] % pipeline.TRANSFER_GROUP]
  assert inside  # some anchor lies inside a group
  k = inside[len(inside) // 2]
  resumed = iter(pipeline.make_train_dataset(config))
  resumed.set_state(states[k])
  _same(full[k:], list(resumed))


@pytest.mark.slow
def test_workers_reuse_their_shared_blocks_and_the_batches_stay_the_same(config,
                                                                        monkeypatch):
  """Over 40 groups each worker rewrites blocks the main process has released (not a new
  segment a group), and every batch equals the in-process one."""
  config.data.source, config.data.num_train_examples = "demo", 40 * pipeline.TRANSFER_GROUP
  config.data.num_epochs = 1
  full = list(pipeline.make_train_dataset(config))
  refs = []
  array = BlockReader.array
  monkeypatch.setattr(BlockReader, "array", lambda self, ref: refs.append(ref) or array(self, ref))
  config.data.num_workers = 2
  _same(full, list(pipeline.make_train_dataset(config)))
  assert len(refs) == 40  # every group in a block
  names = {r.name for r in refs}
  assert len({r.pid for r in refs}) == 2 and len(names) < 20  # reused, not one a group


def test_new_order_each_epoch(config, wds):
  config.data.num_epochs = 2
  config.data.shuffle_window = 6  # windows of a stream do not straddle its 18-record epochs
  for source in ("webdataset", "demo"):
    config.data.source, config.data.train_files = source, wds[0]
    config.data.num_train_examples = 18
    records = pipeline.make_records(config, seed=0, num_epochs=2)
    if source == "webdataset":
      ids = [r["example_id"] for _, r in records]
    else:
      ids = [records[i]["example_id"] for i in range(len(records))]
    first, second = ids[:18], ids[18:]
    assert sorted(first) == sorted(second) and len(set(first)) == 18
    assert first != second, source


@pytest.mark.parametrize("source", ["webdataset", "demo"])
def test_process_shards_partition_the_records(config, wds, source):
  config.data.source, config.data.train_files = source, wds[0]
  config.data.num_train_examples = 18
  shards = [_ids(_batches(config, process_index=i, process_count=2)[0]) for i in range(2)]
  assert not set(shards[0]) & set(shards[1])
  everything = _ids(_batches(config, process_index=0, process_count=1)[0])
  assert sorted(shards[0] + shards[1]) == sorted(everything)
  with pytest.raises(ValueError, match="process_index"):
    pipeline.make_train_dataset(config, process_index=2, process_count=2)


def test_mixture_weights_and_unique_ids(config, wds):
  config.data.source = "mixture"
  config.data.num_epochs = 0
  config.data.num_train_examples = 50
  config.data.mixture = f"webdataset:{wds[0]}=3;demo:=1"
  records = pipeline.make_records(config, seed=0)
  it = iter(records)
  ids = [next(it)[1]["example_id"] for _ in range(400)]
  from_demo = sum(i >> ID_MIXTURE_SHIFT == 1 for i in ids)
  assert 60 < from_demo < 140  # ~100 of 400
  low = (1 << ID_MIXTURE_SHIFT) - 1
  assert {i for i in ids if i >> ID_MIXTURE_SHIFT == 0} == set(wds[1])
  assert {i & low for i in ids if i >> ID_MIXTURE_SHIFT == 1} <= set(range(50))


def test_random_access_mixture(config, tmp_path):
  config.data.source = "mixture"
  config.data.num_train_examples = 12
  config.data.num_epochs = 0
  config.data.mixture = "demo:=1;demo:=1"
  records = pipeline.make_records(config, seed=0)
  ids = [records[i]["example_id"] for i in range(24)]
  assert {i >> ID_MIXTURE_SHIFT for i in ids} == {0, 1}
  assert len(set(ids)) == 24


def test_tfrecord_several_captions_chosen_per_epoch(config, tmp_path):
  pattern = tfrecord_files(str(tmp_path), num_files=2, per_file=4, captions_per_image=5,
                           caption_key="texts")
  config.data.source, config.data.train_files = "tfrecord", pattern
  config.data.example_keys.caption = "texts"
  config.data.num_epochs = 6
  records = list(pipeline.make_records(config, seed=0, num_epochs=6))
  assert len(records) == 48
  preprocess = pipeline.make_preprocessor(config, seed=0)
  tokens = {}
  for index, record in records:
    out = preprocess(index, record)
    assert isinstance(record["caption"], list) and len(record["caption"]) == 5
    tokens.setdefault(record["example_id"], []).append(tuple(out["text_tokens"]))
    again = preprocess(index, record)
    np.testing.assert_array_equal(out["text_tokens"], again["text_tokens"])
  assert len(tokens) == 8
  # Six epochs of five captions each: every image sees more than one of them.
  assert all(len(set(t)) > 1 for t in tokens.values())


def test_folder_and_class_folder_sources(config, tmp_path):
  root = tmp_path / "captioned"
  root.mkdir()
  lines = []
  for i in range(5):
    (root / f"{i}.jpg").write_bytes(jpeg(seed=i))
    lines.append(f'{{"file": "{i}.jpg", "captions": ["a {i}", "b {i}"]}}')
  (root / "captions.jsonl").write_text("\n".join(lines))
  config.data.source, config.data.train_files = "folder", str(root)
  assert sorted(_ids(_batches(config)[0])) == list(range(5))

  csv_root = tmp_path / "csv"
  csv_root.mkdir()
  (csv_root / "x.png").write_bytes(jpeg())
  (csv_root / "captions.csv").write_text('file,caption\nx.png,"a, quoted caption"\n')
  record = pipeline.make_source(config, "train", "folder", str(csv_root))[0]
  assert record["caption"] == "a, quoted caption" and record["image"].startswith(b"\xff\xd8")

  classes = tmp_path / "classes"
  for k, name in enumerate(["tench", "goldfish"]):
    (classes / name).mkdir(parents=True)
    for j in range(3):
      (classes / name / f"{j}.JPEG").write_bytes(jpeg(seed=10 * k + j))
  source = pipeline.make_source(config, "train", "class_folders", str(classes))
  assert source.classnames == ("goldfish", "tench")
  assert [source[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
  spec = dataclasses.replace(pipeline.batch_spec(config), text_len=None, num_classes=2)
  sampler = ResolutionSampler.from_config(config.data.resolution, spec.patch_size,
                                          spec.seq_len)
  batches = list(inference_batches(source, spec, sampler, label_field="label"))
  labels = np.concatenate([b["labels"][b["image_mask"]] for b in batches])
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
