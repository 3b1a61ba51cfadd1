"""Bad inputs away from the training stream: a TFRecord record over the read limit in a
`data convert` / `inspect` work unit, a FIFO or an oversized file among the images of
`embed` / `eval`, a data source with nothing usable as a user error, and a schedule with
no step left after its warmup."""

import os
import threading

import grain
import pytest
from data_fixtures import jpeg, write_tfrecords

from navit_clip.config import default_config
from navit_clip.data.counters import BadSourceError, SkipCountingDataset, skip_marker
from navit_clip.data.sources.tf_example import encode_example
from navit_clip.data.work_units import work_units
from navit_clip.errors import UserError
from navit_clip.evaluate.files import ImageFiles, list_images
from navit_clip.optim import make_schedule


def test_a_tfrecord_work_unit_skips_records_over_the_configured_limit(tiny_config, tmp_path):
  path = str(tmp_path / "data.tfrecord")
  small = encode_example({"image/encoded": jpeg(), "caption": "a red circle"})
  large = encode_example({"image/encoded": bytes(4000), "caption": "too large"})
  write_tfrecords(path, [small, large, small])
  config = tiny_config()
  config.data.source, config.data.train_files = "tfrecord", path
  config.data.max_member_bytes = 2000
  [unit] = work_units(config)
  records = list(unit.records())
  assert [r.get("skip") for r in records] == [None, "oversized_record", None]
  assert records[0]["caption"] == b"a red circle"


def _read_all(source: ImageFiles, timeout_s: float) -> list[dict]:
  """source[0], source[1], ... read in a thread; fails the test if that blocks."""
  out: list[dict] = []
  reader = threading.Thread(target=lambda: out.extend(source[i] for i in range(len(source))),
                            daemon=True)
  reader.start()
  reader.join(timeout_s)
  if reader.is_alive():
    pytest.fail("reading the image files blocked")
  return out


def test_image_files_skip_a_fifo_and_an_oversized_file_without_waiting(tmp_path):
  (tmp_path / "a.jpg").write_bytes(jpeg())
  os.mkfifo(tmp_path / "b.jpg")  # nothing ever writes to it: open() would wait forever
  (tmp_path / "c.png").write_bytes(bytes(5000))
  try:
    records = _read_all(ImageFiles(list_images(str(tmp_path)), max_file_bytes=4000), 20)
  finally:  # a reader blocked on the FIFO (the defect) is released
    try:
      os.close(os.open(tmp_path / "b.jpg", os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting
      pass
  assert [r.get("skip") for r in records] == [None, "unreadable", "oversized_file"]
  assert records[0]["image"] == jpeg() and records[0]["path"] == str(tmp_path / "a.jpg")


def test_a_source_with_nothing_usable_is_a_user_error():
  markers = grain.MapDataset.source([skip_marker("not_an_image", i) for i in range(4)])
  counted = SkipCountingDataset(markers.to_iter_dataset(), source="folder 'photos'",
                                max_bad_fraction=1.0, min_records=4)
  with pytest.raises(UserError, match=r"folder 'photos': none of the 4 records read was "
                     r"usable \(not_an_image: 4\)") as error:
    list(counted)
  assert isinstance(error.value, BadSourceError)


@pytest.mark.parametrize("schedule, total, cooldown, named", [
    ("cosine", 10, 0, r"config.optim.warmup_steps \(10\):"),
    ("linear", 4, 0, r"config.optim.warmup_steps \(10\):"),
    ("rsqrt", 15, 5, r"config.optim.warmup_steps \(10\) \+ config.optim.cooldown_steps \(5\):"),
])
def test_a_schedule_without_steps_after_its_warmup_is_a_user_error_naming_the_keys(
    schedule, total, cooldown, named):
  c = default_config().optim
  c.update(dict(schedule=schedule, warmup_steps=10, cooldown_steps=cooldown))
  with pytest.raises(UserError, match=rf"^config.train.total_steps \({total} optimizer "
                     rf"updates\) must exceed {named}"):
    make_schedule(c, total)
  make_schedule(c, 16)  # steps left after the warmup (and cooldown): fine
