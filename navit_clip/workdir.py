"""A workdir's saved config: what training and `import` write, and every command reads.

  workdir/config.json       the run's config (JSON), read back by evaluate.restore.load_config
  workdir/tokenizer.model   the run's copy of its SentencePiece model; config.json names it
                            relative to the workdir, so a moved or copied workdir still
                            finds it
The workdir is a local folder or a URL (gs://, s3://, ...; navit_clip.storage).
"""

from __future__ import annotations

import os

import ml_collections

from navit_clip import storage

WORKDIR_TOKENIZER = "tokenizer.model"  # the run's copy, named relative to the workdir


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes workdir/config.json; the tokenizer config.data.tokenizer.path names is copied to
  workdir/tokenizer.model and named there relative to the workdir. `config` is unchanged."""
  storage.makedirs(workdir)
  saved = config
  if config.data.tokenizer.path:
    copy_path = storage.join(workdir, WORKDIR_TOKENIZER)
    if storage.absolute(config.data.tokenizer.path) != storage.absolute(copy_path):
      storage.copy(config.data.tokenizer.path, copy_path)
    saved = config.copy_and_resolve_references()
    saved.data.tokenizer.path = WORKDIR_TOKENIZER
  storage.write_atomic(storage.join(workdir, "config.json"),
                       saved.to_json_best_effort(indent=2, sort_keys=True))


def saved_tokenizer_path(workdir: str, saved: str) -> str:
  """The tokenizer that config.json's data.tokenizer.path `saved` names: a relative path
  (the workdir's copy) under `workdir`, any other path as it is."""
  if saved and storage.is_local(saved) and not os.path.isabs(saved):
    return storage.join(storage.absolute(workdir), saved)
  return saved
