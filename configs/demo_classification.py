"""The CPU demo in classification mode: the demo image tower with a 40-way softmax head
over the synthetic shapes' (shape, colour) classes.

    navit-clip train --config demo_classification --workdir /tmp/demo_cls

Evaluated on the held-out images by its own 40-way logits (top-1 / top-5, inside training
every 500 steps) and by 1, 5 and 10-shot linear probes on its image embeddings, at 32
patches an image (the demo's zero-shot evaluators need a text tower).
"""

import ml_collections

from navit_clip.config import eval_config
from navit_clip.configs import demo


def get_config(arg: str = ""):
  c = demo.get_config(arg)
  c.task = "classification"
  c.model.num_classes = 40  # navit_clip.data.sources.demo.NUM_CLASSES
  c.loss.name = "softmax_xent"
  c.data.label_field = "label"
  c.optim.lr = 3e-3
  c.evals = ml_collections.ConfigDict()
  c.evals.label = eval_config("classification", "demo:label", resolution="budget:32",
                              every_steps=500)
  c.evals.label_fewshot = eval_config("fewshot", "demo:label", resolution="budget:32")
  return c
