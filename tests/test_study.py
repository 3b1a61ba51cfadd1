"""`navit-clip study --quick` end to end: every run trains, is scored, and lands in the report."""

import json
import os

import pytest

from navit_clip import cli, study
from navit_clip.config import validate
from navit_clip.config_loading import load_config
from navit_clip.configs import study as study_configs
from navit_clip.data.sources import study_shapes


@pytest.mark.slow
def test_quick_study_writes_the_tables_and_plots_at_equal_tokens(tmp_path, capsys):
  workdir = str(tmp_path / "study")
  # Towers of one layer compile in about half the time; the runs and the report are the same.
  assert cli.main(["study", "--quick", "--workdir", workdir,
                   "--config.model.image.variant=w32-d1-m64-h2/8",
                   "--config.model.text.variant=w32-d1-m64-h2"]) == 0
  md = open(os.path.join(workdir, "study.md"), encoding="utf-8").read()
  for heading in ("## 1. NaViT against the ViT baseline", "## 2. Position embeddings",
                  "## 3. Token dropping", "## 4. One NaViT model at many resolutions"):
    assert heading in md
  assert md in capsys.readouterr().out  # the report is printed too
  for name in ("navit_vs_vit", "posemb", "token_drop", "resolution_sweep"):
    with open(os.path.join(workdir, f"{name}.png"), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  runs = json.load(open(os.path.join(workdir, "results.json"), encoding="utf-8"))["runs"]
  plan = study.QUICK
  assert set(runs) == ({r.name for r in study.equal_compute_runs(plan)}
                       | {f"{v}_equal_images_s{s}" for v in study.DROP_VARIANTS
                          for s in plan.drop_seeds})
  # Equal compute: every run at the token budget counted the same real tokens, up to the
  # rounding of its steps (half a step of ~1,000 tokens per evaluation interval, 2 of them,
  # of 24,000) and the estimate of its tokens per step; equal images: as many images as
  # NaViT's run, at well under its tokens.
  tokens = {n: r["tokens_seen"] for n, r in runs.items() if "equal_images" not in n}
  assert max(tokens.values()) - min(tokens.values()) <= 0.1 * plan.tokens
  for s in plan.drop_seeds:
    navit_images = runs[f"navit_s{s}"]["images_seen"]
    for v in study.DROP_VARIANTS:
      assert abs(runs[f"{v}_equal_images_s{s}"]["images_seen"] - navit_images) <= (
          0.15 * navit_images)
      assert runs[f"{v}_equal_images_s{s}"]["tokens_seen"] < 0.9 * tokens[f"navit_s{s}"]
  for r in runs.values():
    assert len(r["curve"]) == plan.points
    assert all(0.0 <= p[k] <= 1.0 for p in r["curve"] for k in ("top1", "proportion", "kind"))
  assert set(runs["navit_absolute_s0"]["at_sides"]) == {f"side:{s}" for s in plan.sides}


def test_shape_accuracies_split_the_shape_into_proportion_and_kind():
  # circle -> circle, wide ellipse -> wide rectangle (proportion right, kind wrong),
  # tall rectangle -> square (kind right, proportion wrong), square -> tall ellipse (neither).
  got = study_shapes.shape_accuracies([0, 4, 3, 2], [0, 1, 5, 3])
  assert got == {"top1": 0.25, "proportion": 0.5, "kind": 0.5}
  with pytest.raises(ValueError, match="aligned"):
    study_shapes.shape_accuracies([0, 1], [0])


def test_study_shapes_records_are_reproducible_disjoint_and_drawn_as_named():
  train = study_shapes.StudyShapesSource("train", num_examples=120, seed=1)
  held_out = study_shapes.StudyShapesSource("eval", num_examples=120, seed=1)
  again = study_shapes.StudyShapesSource("train", num_examples=120, seed=1)
  assert train[7]["image"].tobytes() == again[7]["image"].tobytes()
  assert {train[i]["example_id"] for i in range(120)}.isdisjoint(
      held_out[i]["example_id"] for i in range(120))
  seen = set()
  for i in range(120):
    r = train[i]
    h, w, _ = r["image"].shape
    assert 1 / 3.05 <= w / h <= 3.05 and 60 <= (h * w) ** 0.5 <= 132
    assert study_shapes.SHAPES[r["shape"]] in r["caption"]
    assert (r["kind"], r["proportion"]) == divmod(r["shape"], 3)
    rows, cols = (r["image"].min(axis=2) > 120).nonzero()  # the bright shape
    ratio = (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)
    want = (1.0, 2.0, 0.5)[r["proportion"]]
    assert want / 1.25 < ratio < want * 1.25, (i, ratio, want)
    seen.add(r["shape"])
  assert seen == set(range(6))
  with pytest.raises(ValueError, match="max_aspect"):
    study_shapes.StudyShapesSource("train", max_aspect=0.5)


def test_every_study_variant_validates_and_steps_about_the_same_tokens():
  for variant in study_configs.VARIANTS:
    c = load_config(f"study:{variant}")
    validate(c)
    slots = c.data.batch_size * c.data.seq_len  # NaViT: 8 x 128; ViT: 28 x 36, no padding
    assert 1000 <= slots <= 1024, variant
  vit = load_config("study:vit").data
  assert (vit.resolution.kind, vit.resolution.square_side, vit.max_images) == ("square", 48, 1)
  with pytest.raises(ValueError, match="variant 'vit2'"):
    load_config("study:vit2")
