"""The entries of `config.evals`: their kinds, their defaults and their check.

Recipes add evaluators by name, `c.evals.imagenet = eval_config("zeroshot", "folder:DIR",
classnames="imagenet", every_steps=5000)`; navit_clip.evaluate.runner runs them.

  zeroshot        contrastive models: top-1 / top-5 / per-class from class names x templates
  retrieval       contrastive models: image->text and text->image recall@1/5/10
  resolutions     contrastive models: zero-shot at each patch budget of `budgets`
  fewshot         both: linear probes on frozen image embeddings, `shots` x `seeds`
  classification  classification models: top-1 / top-5 (softmax) or prec@1 / mAP (sigmoid)
                  of the model's own logits
"""

from __future__ import annotations

import ml_collections

from navit_clip.choices import check_choice, check_range, naming
from navit_clip.evaluate.inference_resolution import ResolutionPolicy

EVAL_KINDS = ("zeroshot", "retrieval", "resolutions", "fewshot", "classification")
CONTRASTIVE_KINDS = ("zeroshot", "retrieval", "resolutions")  # they embed texts
_NAMED_CLASSES_KINDS = ("zeroshot", "resolutions")  # classnames and templates apply


def eval_config(kind: str, dataset: str, **overrides) -> ml_collections.ConfigDict:
  """One evaluator of `config.evals`, with its defaults (every key, its type, its comment)."""
  e = ml_collections.ConfigDict()
  e.kind = kind  # one of EVAL_KINDS
  e.dataset = dataset  # see navit_clip.evaluate.datasets: demo:TASK | folder:DIR | coco:... | ...
  e.every_steps = 0  # run inside training after every N-th step; 0 = standalone only
  e.resolution = "budget:256"  # inference policy: budget:N | side:S | native
  e.budgets = "64,128,256,576,1024"  # resolutions: the patch budgets of the sweep
  e.classnames = ""  # zeroshot: shipped list ("imagenet") or file; "" = the dataset's
  e.templates = ""  # zeroshot: "clip" | "clip_short" | file; "" = the dataset's, else "clip"
  e.split = "test"  # karpathy / tfds split
  e.images_dir = ""  # coco / karpathy: image root ("" = the annotation file's directory)
  e.data_dir = ""  # tfds data directory
  e.max_examples = 0  # evaluate the first N records only; 0 = all
  e.batch_size = 0  # inference batch rows; 0 = config.data.batch_size
  e.seq_len = 0  # tokens per row; 0 = max(config.data.seq_len, what the policy needs)
  e.max_images = 0  # images per row; 0 = config.data.max_images
  e.num_workers = 0  # Grain decoding processes
  e.shots = "1,5,10"  # fewshot: images per class of each probe
  e.seeds = "0,1,2"  # fewshot: one draw of shots (and of the images choosing l2) per seed
  # fewshot: the labelled dataset the shots come from; "" = every other image of `dataset`
  # (in example-id order), the probes scored on the others
  e.train_dataset = ""
  e.num_classes = 0  # fewshot: K; 0 = the number of classes the dataset names
  e.update(overrides)
  return e


def check_config(evals: ml_collections.ConfigDict) -> None:
  """Checks every entry of config.evals; raises ValueError naming the key."""
  for name, e in evals.items():
    _check_evaluator(f"config.evals.{name}", e)


def _check_evaluator(key: str, e: ml_collections.ConfigDict) -> None:
  check_choice(f"{key}.kind", e.kind, EVAL_KINDS)
  if not e.dataset:
    raise ValueError(f"{key}.dataset is empty")
  for field in ("every_steps", "max_examples", "batch_size", "seq_len", "max_images",
                "num_workers"):
    check_range(f"{key}.{field}", e[field], 0)
  with naming(f"{key}.resolution", e.resolution):
    ResolutionPolicy.parse(e.resolution)
  with naming(f"{key}.budgets", e.budgets):
    for budget in e.budgets.split(","):
      ResolutionPolicy("budget", int(budget))
  if e.kind not in _NAMED_CLASSES_KINDS and (e.classnames or e.templates):
    raise ValueError(f"{key}: classnames / templates apply to zero-shot, not {e.kind}")
  check_range(f"{key}.num_classes", e.num_classes, 0)
  if e.kind == "fewshot":
    with naming(f"{key}.shots", e.shots):
      for shots in parse_ints(e.shots):
        check_range("shots", shots, 1)
    with naming(f"{key}.seeds", e.seeds):
      parse_ints(e.seeds)
  elif e.train_dataset:
    raise ValueError(f"{key}.train_dataset applies to fewshot, not {e.kind}")


def parse_ints(spec: str) -> list[int]:
  """"1,5,10" -> [1, 5, 10]; raises ValueError for an empty list or a non-integer."""
  values = [v.strip() for v in spec.split(",") if v.strip()]
  if not values:
    raise ValueError("expected a comma-separated list of integers, got none")
  try:
    return [int(v) for v in values]
  except ValueError:
    raise ValueError(f"expected a comma-separated list of integers, got {spec!r}") from None
