"""navit_clip.evaluate: zero-shot, retrieval, few-shot and resolution-sweep evaluators."""
