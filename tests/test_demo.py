"""The demo command's pieces that need no training: its tokenizer, final report and plot."""

import json
import os
import re

import pytest
import sentencepiece as spm

from navit_clip import demo
from navit_clip.data.sources.demo import caption_corpus


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  c = demo.demo_config(workdir)
  demo.train_demo_tokenizer(c)
  return c


def test_tokenizer_keeps_every_caption_word_whole_and_every_caption_fits(config):
  sp = spm.SentencePieceProcessor(model_file=config.data.tokenizer.path)
  assert sp.get_piece_size() == config.model.text.vocab_size
  captions = list(caption_corpus(3000, seed=1))  # other captions than it was trained on
  for caption in captions:
    pieces = sp.encode(caption.lower(), out_type=str)
    assert len(pieces) <= config.model.text.max_len - 1, caption  # room for EOS
    assert "".join(pieces).replace("\u2581", " ").strip() == caption.lower()
    for word in re.findall(r"[a-z]+", caption.lower()):
      assert [f"\u2581{word}"] == sp.encode(word, out_type=str), word


def test_final_report_reads_every_held_out_image(config, monkeypatch):
  seen = {}

  def fake_run_all(model, cfg, names):
    seen.update({n: cfg.evals[n].max_examples for n in names})
    return {}

  monkeypatch.setattr(demo, "run_all", fake_run_all)
  assert {n: e.max_examples for n, e in config.evals.items()} == {
      "shape": 300, "color": 300, "label": 300}  # inside training: the first 300
  demo.zero_shot_report(model=None, config=config)
  assert seen == {"shape": 0, "color": 0, "label": 0}  # 0 = all of them
  assert config.evals.shape.max_examples == 300  # the caller's config is left as it was


def test_plot_shows_the_loss_and_each_task_by_step(tmp_path):
  records = [{"step": s, "split": "train", "loss": 5.0 - s / 100} for s in (50, 100, 150)]
  records += [{"step": s, "split": "eval", "shape/top1": s / 400, "color/top1": 0.9}
              for s in (100, 150)]
  with open(tmp_path / "metrics.jsonl", "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  train_records, eval_records = demo.read_history(str(tmp_path))
  assert [r["step"] for r in train_records] == [50, 100, 150]
  assert [r["step"] for r in eval_records] == [100, 150]
  report = {"shape": {"top1": 0.5, "chance": 0.2}, "color": {"top1": 0.95, "chance": 0.125}}
  path = demo.plot_history(str(tmp_path), report, final_step=150)
  assert path == os.path.join(str(tmp_path), demo.PLOT_NAME)
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
