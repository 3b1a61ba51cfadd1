"""The folder source's CSV index as open_clip writes it: any separator, named image and
caption columns, paths relative to an image root or absolute inside it."""

import pytest

from data_fixtures import jpeg
from navit_clip import cli
from navit_clip.config import default_config, validate
from navit_clip.data import pipeline
from navit_clip.data.counters import SKIP_KEY
from navit_clip.errors import UserError


def _images(folder, names) -> list[str]:
  folder.mkdir(parents=True, exist_ok=True)
  for i, name in enumerate(names):
    (folder / name).write_bytes(jpeg(seed=i))
  return [str(folder / name) for name in names]


def _source(files: str, **keys):
  config = default_config()
  config.data.source, config.data.train_files = "folder", files
  for k, v in keys.items():
    config.data[k] = v
  validate(config)
  return pipeline.make_source(config, "train")


def _outcomes(source) -> list:
  return [r.get("caption", r.get(SKIP_KEY)) for r in (source[i] for i in range(len(source)))]


def test_open_clip_tsv_with_absolute_paths_under_the_image_root(tmp_path):
  paths = _images(tmp_path / "images" / "part0", ["a.jpg", "b.jpg"])
  index = tmp_path / "meta" / "train.csv"
  index.parent.mkdir()
  index.write_text("title\tfilepath\textra\n" + "".join(
      f"caption {i}\t{p}\tx\n" for i, p in enumerate(paths)))
  source = _source(str(index), csv_separator="\\t", csv_image_key="filepath",
                   csv_caption_key="title", image_root=str(tmp_path / "images"))
  assert _outcomes(source) == ["caption 0", "caption 1"]
  assert source[1]["image"] == jpeg(seed=1)


def test_the_default_columns_include_open_clips_filepath_and_title(tmp_path):
  _images(tmp_path, ["a.jpg"])
  (tmp_path / "captions.csv").write_text("filepath;title\na.jpg;a red star\n")
  assert _outcomes(_source(str(tmp_path), csv_separator=";")) == ["a red star"]


def test_relative_paths_are_relative_to_the_image_root_and_may_not_leave_it(tmp_path):
  _images(tmp_path / "pics", ["a.jpg", "b.jpg"])
  (tmp_path / "secret.jpg").write_bytes(jpeg())
  (tmp_path / "index").mkdir()
  (tmp_path / "index" / "captions.csv").write_text(
      "file,caption\na.jpg,one\n../secret.jpg,two\nsub/../b.jpg,three\n"
      f"{tmp_path / 'secret.jpg'},four\n{tmp_path / 'pics' / 'b.jpg'},five\n")
  source = _source(str(tmp_path / "index"), image_root=str(tmp_path / "pics"))
  assert _outcomes(source) == ["one", "unsafe_path", "three", "unsafe_path", "five"]


def test_absolute_paths_outside_the_default_root_are_one_error_naming_image_root(tmp_path):
  paths = _images(tmp_path / "data" / "imgs", ["a.jpg", "b.jpg"])
  (tmp_path / "idx").mkdir()
  (tmp_path / "idx" / "captions.csv").write_text(
      "file,caption\n" + "".join(f"{p},x\n" for p in paths))
  with pytest.raises(UserError, match=r"absolute .* none lies inside the image root .*idx.*"
                     r"config\.data\.image_root .*data/imgs"):
    _source(str(tmp_path / "idx"))
  assert len(_source(str(tmp_path / "idx"), image_root="/")) == 2


@pytest.mark.parametrize("header, keys, match", [
    ("filepath,caption", {"csv_caption_key": "title"},
     r"no caption column 'title' \(config.data.csv_caption_key\); its columns are "
     r"\['filepath', 'caption'\]"),
    ("path,caption", {"csv_image_key": "filepath"},
     r"no image column 'filepath' .*\['path', 'caption'\]"),
    ("file,label", {}, r"no caption column .*\['file', 'label'\]"),
    ("url,caption", {}, r"no image column .*\['url', 'caption'\]"),
    ("filepath\ttitle", {}, r"\['filepath\\ttitle'\] \(it looks '\\\\t'-separated: set "
     r"config.data.csv_separator=\\t\)"),
])
def test_a_missing_column_is_an_error_listing_the_columns(tmp_path, header, keys, match):
  _images(tmp_path, ["a.jpg"])
  (tmp_path / "captions.csv").write_text(f"{header}\na.jpg,x\n")
  with pytest.raises(UserError, match=match):
    _source(str(tmp_path), **keys)


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
  _images(tmp_path, ["a.jpg"])
  (tmp_path / "captions.csv").write_text("filepath,caption\na.jpg,x\n")
  assert cli.main(["data", "inspect", "--source", "folder", "--files", str(tmp_path),
                   "--config.data.csv_caption_key=title"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no caption column 'title'" in err[0], err


@pytest.mark.parametrize("sep", ["", "ab", "\\n", '"'])
def test_a_bad_separator_is_refused_naming_the_key(sep):
  config = default_config()
  config.data.csv_separator = sep
  with pytest.raises(ValueError, match="config.data.csv_separator"):
    validate(config)


def test_tab_may_be_written_as_tab_or_a_tab_character(tmp_path):
  _images(tmp_path, ["a.jpg"])
  (tmp_path / "captions.csv").write_text("file\tcaption\na.jpg\tone, two\n")
  for sep in ("tab", "\t", "\\t"):
    assert _outcomes(_source(str(tmp_path), csv_separator=sep)) == ["one, two"]
