"""SentencePiece caption tokenizer: load any .model file, encode to a fixed length, train.

An encoded caption is a row of T int32 ids: its pieces, then EOS, then padding. A caption
longer than T keeps its first T - 1 pieces and still ends with EOS, so every encoded caption
holds an EOS, and the text tower reads a caption up to its first EOS. What follows the EOS
is read only by towers that pool the last position (SigLIP's), so for the others the
padding id only has to be a valid id: models without a pad piece (pad id -1) pad with id 0,
and `pad_id` chooses another (SigLIP pads with EOS).

Models trained here use the T5 ids (pad 0, EOS 1, unk 2, no BOS); `lowercase=True` at
training time stores case folding in the model itself (normalisation rule "nmt_nfkc_cf").
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from navit_clip import storage
from navit_clip.errors import MissingInputError, UserError

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
MODEL_TYPES = ("unigram", "bpe")


class Tokenizer:
  """Encodes captions into int32 [N, T] with a SentencePiece model.

  Picklable (the model travels as bytes), so it can run in Grain worker processes.

  Args:
    path: a SentencePiece .model file (a local path or a URL, see navit_clip.storage): T5
      c4_en 32k, mT5, Gemma 256k, or one written by `train_tokenizer`.
    max_len: T, the length of every encoded caption, EOS included (>= 1).
    lowercase: lowercase captions before encoding, for models trained on lowercased text
      that do not fold case themselves (e.g. SigLIP's English T5 tokenizer).
    pad_id: the id written after EOS; None = the model's pad id. It matters only to text
      towers that read the padding (pool "last"): SigLIP pads with EOS (1), SigLIP 2 with
      the Gemma pad id (0).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: `path` is not a SentencePiece model, the model has no EOS piece, or `pad_id`
      is not one of its ids.
  """

  def __init__(self, path: str | os.PathLike, max_len: int, *, lowercase: bool = False,
               pad_id: int | None = None):
    self.path = os.fspath(path)
    if max_len < 1:
      raise ValueError(f"Tokenizer max_len must be >= 1 (room for EOS), got {max_len}")
    try:
      proto = storage.read_bytes(self.path)
    except FileNotFoundError:
      raise FileNotFoundError(f"SentencePiece model {self.path!r} does not exist") from None
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:
      raise ValueError(f"{self.path!r} is not a valid SentencePiece model: {e}") from e
    if self._sp.eos_id() < 0:
      raise ValueError(f"SentencePiece model {self.path!r} has no EOS piece; captions must "
                       "end with EOS")
    if pad_id is not None and not 0 <= pad_id < self._sp.GetPieceSize():
      raise ValueError(f"Tokenizer pad_id {pad_id} is not an id of {self.path!r} "
                       f"(0..{self._sp.GetPieceSize() - 1})")
    self.max_len, self.lowercase = max_len, lowercase
    # plain ints: each SentencePiece call costs about 20 us, per caption on the hot path
    self.eos_id: int = self._sp.eos_id()
    # the `pad_id` given, else the model's pad id, or 0 for models without a pad piece
    self.pad_id: int = max(self._sp.pad_id(), 0) if pad_id is None else pad_id

  @property
  def vocab_size(self) -> int:
    """Number of pieces; every id is in [0, vocab_size)."""
    return self._sp.GetPieceSize()

  def encode(self, texts: Sequence[str]) -> np.ndarray:
    """Captions -> int32 [N, T]: pieces, EOS, pad; truncated to T - 1 pieces + EOS.

    Each caption is encoded on its own: SentencePiece's list call starts a thread pool per
    call, which costs far more than the encoding of a caption or two (the per-example case).
    """
    if isinstance(texts, str):
      raise TypeError("Tokenizer.encode takes a list of captions, got one string; wrap it "
                      "in a list")
    texts = [t.lower() for t in texts] if self.lowercase else list(texts)
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    eos, keep = self.eos_id, self.max_len - 1
    for row, text in zip(out, texts):
      ids = self._sp.EncodeAsIds(text)[:keep]
      ids.append(eos)
      row[:len(ids)] = ids
    return out

  def decode(self, tokens: np.ndarray) -> list[str]:
    """int [N, T] -> N captions, each read up to its first EOS."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
      raise ValueError(f"Tokenizer.decode expects tokens [N, T], got shape {tokens.shape}")
    texts = []
    for row in tokens.tolist():
      end = row.index(self.eos_id) if self.eos_id in row else len(row)
      texts.append(self._sp.DecodeIds(row[:end]))
    return texts

  def check_config(self, text_config) -> None:
    """Raises ValueError if config.model.text cannot embed this tokenizer's ids.

    Out-of-range ids would be clamped silently by the embedding lookup, and a wrong EOS id
    would make the tower read captions to the wrong end.
    """
    if text_config.vocab_size < self.vocab_size:
      raise ValueError(f"config.model.text.vocab_size = {text_config.vocab_size} is smaller "
                       f"than the {self.vocab_size} pieces of {self.path!r}")
    if text_config.eos_id != self.eos_id:
      raise ValueError(f"config.model.text.eos_id = {text_config.eos_id} but the EOS id of "
                       f"{self.path!r} is {self.eos_id}")
    if text_config.max_len < self.max_len:
      raise ValueError(f"config.model.text.max_len = {text_config.max_len} is shorter than "
                       f"the tokenizer's max_len {self.max_len}")


def train_tokenizer(captions: Iterable[str], vocab_size: int, out_path: str | os.PathLike, *,
                    lowercase: bool = False, byte_fallback: bool = False,
                    model_type: str = "unigram", max_sentences: int = 5_000_000) -> None:
  """Trains a SentencePiece model on `captions` and writes it to `out_path`.

  Args:
    captions: any iterable of caption strings; empty ones are skipped.
    vocab_size: exact number of pieces, the pad, EOS and unk pieces included.
    out_path: the .model file to write (parent folders are created).
    lowercase: fold case inside the model (it then lowercases whatever it encodes).
    byte_fallback: encode unknown characters as UTF-8 byte pieces instead of unk (needs 256
      byte pieces in the vocabulary).
    model_type: one of MODEL_TYPES.
    max_sentences: train on a uniform sample of at most this many captions.

  Raises:
    ValueError: no captions, a bad argument, or a vocab_size the corpus cannot fill.
  """
  if model_type not in MODEL_TYPES:
    raise ValueError(f"model_type = {model_type!r}; expected one of {list(MODEL_TYPES)}")
  if vocab_size < 4:
    raise ValueError(f"vocab_size must be >= 4 (pad, EOS, unk and one piece), got {vocab_size}")
  counted = _CountingIterator(captions)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=counted, model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
        byte_fallback=byte_fallback,
        normalization_rule_name="nmt_nfkc_cf" if lowercase else "nmt_nfkc",
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
  except RuntimeError as e:
    if not counted.count:
      raise ValueError(f"no captions to train a tokenizer on (writing {out_path!r})") from e
    too_high = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)",
                         str(e))
    if too_high:
      raise ValueError(f"vocab_size = {vocab_size} is too large for this corpus of "
                       f"{counted.count} captions: at most {too_high.group(1)} pieces can be "
                       "learned from it; lower vocab_size or add captions") from e
    raise ValueError(f"training a {vocab_size}-piece SentencePiece model failed: {e}") from e
  out_path = os.fspath(out_path)
  if storage.is_local(out_path):
    storage.makedirs(os.path.dirname(os.path.abspath(out_path)))
  storage.write_atomic(out_path, model.getvalue())


def train_from_file(input_path: str | os.PathLike, vocab_size: int,
                    out: str | os.PathLike, lowercase: bool = False) -> None:
  """Trains a tokenizer on a text file of one caption per line (UTF-8) and writes `out`.

  Raises:
    MissingInputError: `input_path` does not exist.
    UserError: `input_path` is not UTF-8 text (names the byte offset), or what
      `train_tokenizer` raises as ValueError (no captions, a vocab_size the file cannot
      fill), naming the file.
  """
  input_path = os.fspath(input_path)
  if not storage.isfile(input_path):
    raise MissingInputError(f"caption file {input_path!r} does not exist")
  reader = _CaptionFileLines(input_path)
  try:
    train_tokenizer(reader, vocab_size, out, lowercase=lowercase)
  except ValueError as e:
    if reader.error is not None:  # SentencePiece reports it only as a failed training
      raise reader.error from None
    if isinstance(e, UserError):
      raise
    raise UserError(f"{input_path}: {e}") from e


class _CaptionFileLines:
  """The lines of a UTF-8 text file; keeps the UserError that stopped the reading.

  A byte that is not UTF-8, or a NUL byte (a binary file), stops the reading with a
  UserError naming the file and the byte offset.
  """

  def __init__(self, path: str):
    self.path, self.error = path, None

  def __iter__(self) -> Iterator[str]:
    offset = 0
    with storage.open_stream(self.path) as f:
      for raw in f:
        yield self._decode(raw, offset)
        offset += len(raw)

  def _decode(self, raw: bytes, offset: int) -> str:
    nul = raw.find(b"\0")
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      self.error = UserError(f"caption file {self.path!r} is not UTF-8 text: byte "
                             f"{raw[e.start]:#04x} at offset {offset + e.start} "
                             f"({e.reason})")
      raise self.error from None
    if nul >= 0:
      self.error = UserError(f"caption file {self.path!r} is not text: a NUL byte at "
                             f"offset {offset + nul}")
      raise self.error
    return text.rstrip("\r\n")


class _CountingIterator:
  """Yields the non-blank strings of an iterable and counts them."""

  def __init__(self, texts: Iterable[str]):
    self._texts, self.count = iter(texts), 0

  def __iter__(self) -> Iterator[str]:
    return self

  def __next__(self) -> str:
    while True:
      text = next(self._texts)
      if text.strip():
        self.count += 1
        return text
