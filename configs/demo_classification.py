"""The CPU demo in classification mode: the demo image tower with a 40-way softmax head
over the synthetic shapes' (shape, colour) classes.

    navit-clip train --config demo_classification --workdir /tmp/demo_cls
"""

from navit_clip.configs import demo


def get_config(arg: str = ""):
  c = demo.get_config(arg)
  c.task = "classification"
  c.model.num_classes = 40  # navit_clip.data.sources.demo.NUM_CLASSES
  c.loss.name = "softmax_xent"
  c.data.label_field = "label"
  c.optim.lr = 3e-3
  return c
