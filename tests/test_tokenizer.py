"""Tokenizer: training on a tiny corpus, fixed-length encoding, errors naming the bad input."""

import pickle
import random

import ml_collections
import numpy as np
import pytest
import sentencepiece as spm

from navit_clip.text import tokenizer as tok

WORDS = ("a photo of the cat dog bird sits runs on in under red blue green small big mat park "
         "tree car house").split()
VOCAB = 40


def captions(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "sub" / "captions.model"
  tok.train_tokenizer(iter(captions(300)), VOCAB, path)
  return path


def test_trained_model_has_t5_ids_and_exact_vocab(model_path):
  t = tok.Tokenizer(model_path, max_len=8)
  assert (t.vocab_size, t.pad_id, t.eos_id) == (VOCAB, 0, 1)


def test_encode_pads_after_eos(model_path):
  t = tok.Tokenizer(model_path, max_len=16)
  out = t.encode(["a cat", "", "the big red dog sits on a mat"])
  assert out.dtype == np.int32 and out.shape == (3, 16)
  for row in out:
    eos = np.flatnonzero(row == t.eos_id)
    assert len(eos) == 1  # exactly one EOS, then only padding
    assert (row[eos[0] + 1:] == t.pad_id).all()
    assert (row[:eos[0]] != t.pad_id).all()
  assert out[1, 0] == t.eos_id  # an empty caption is EOS alone
  assert t.decode(out) == ["a cat", "", "the big red dog sits on a mat"]


def test_encode_gives_sentencepiece_ids(model_path):
  """Captions encoded one at a time hold the ids of SentencePiece's own list call."""
  texts = captions(20, seed=3) + ["", "a"]
  sp = spm.SentencePieceProcessor(model_file=str(model_path))
  out = tok.Tokenizer(model_path, max_len=6).encode(texts)
  for row, ids in zip(out, sp.EncodeAsIds(texts)):
    want = ids[:5] + [1]
    np.testing.assert_array_equal(row[:len(want)], want)
    assert (row[len(want):] == 0).all()


def test_pad_id_chooses_the_padding_after_eos(model_path):
  """SigLIP's layout: the caption, EOS, then EOS again to the end (sticky EOS)."""
  plain = tok.Tokenizer(model_path, max_len=12).encode(["a cat", "the big red dog"])
  sticky = tok.Tokenizer(model_path, max_len=12, pad_id=1)
  out = sticky.encode(["a cat", "the big red dog"])
  for row, want in zip(out, plain):
    eos = int(np.flatnonzero(want == 1)[0])
    np.testing.assert_array_equal(row[:eos + 1], want[:eos + 1])
    assert (row[eos:] == 1).all()
  assert sticky.pad_id == 1 and sticky.decode(out) == ["a cat", "the big red dog"]
  with pytest.raises(ValueError, match="pad_id 40 is not an id"):
    tok.Tokenizer(model_path, max_len=12, pad_id=VOCAB)


def test_encode_truncates_and_keeps_eos_last(model_path):
  long = " ".join(["green tree"] * 20)
  full = tok.Tokenizer(model_path, max_len=64).encode([long])[0]
  n = int(np.flatnonzero(full == 1)[0])
  assert n > 6
  short = tok.Tokenizer(model_path, max_len=6).encode([long])[0]
  np.testing.assert_array_equal(short[:5], full[:5])
  assert short[5] == 1


def test_encode_rejects_a_bare_string(model_path):
  with pytest.raises(TypeError, match="list of captions"):
    tok.Tokenizer(model_path, max_len=8).encode("a cat")


def test_lowercase_option(model_path):
  cased = tok.Tokenizer(model_path, max_len=12)
  lower = tok.Tokenizer(model_path, max_len=12, lowercase=True)
  assert (cased.encode(["A CAT"]) != cased.encode(["a cat"])).any()
  np.testing.assert_array_equal(lower.encode(["A CAT"]), cased.encode(["a cat"]))


def test_trained_lowercase_model_folds_case_itself(tmp_path):
  path = tmp_path / "lower.model"
  tok.train_tokenizer(captions(300), VOCAB, path, lowercase=True)
  t = tok.Tokenizer(path, max_len=12)
  np.testing.assert_array_equal(t.encode(["A Cat SITS"]), t.encode(["a cat sits"]))


def test_pickles_for_worker_processes(model_path):
  t = tok.Tokenizer(model_path, max_len=10, lowercase=True)
  texts = ["A dog in the park", "blue car"]
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(t)).encode(texts), t.encode(texts))


def test_missing_and_corrupt_model_files_name_the_path(tmp_path):
  missing = tmp_path / "nope.model"
  with pytest.raises(FileNotFoundError, match="nope.model"):
    tok.Tokenizer(missing, max_len=8)
  corrupt = tmp_path / "corrupt.model"
  corrupt.write_bytes(b"\x00 this is not a sentencepiece model \xff" * 4)
  with pytest.raises(ValueError, match="corrupt.model.*not a valid SentencePiece model"):
    tok.Tokenizer(corrupt, max_len=8)


def test_vocab_too_large_for_corpus_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"vocab_size = 5000 is too large .* at most \d+ pieces"):
    tok.train_tokenizer(captions(50), 5000, tmp_path / "x.model")
  assert not (tmp_path / "x.model").exists()


def test_empty_corpus_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no captions"):
    tok.train_tokenizer(["", "   "], VOCAB, tmp_path / "x.model")


def test_train_from_file(tmp_path):
  src = tmp_path / "captions.txt"
  src.write_text("\n".join(captions(300, seed=1)) + "\n\n", encoding="utf-8")
  out = tmp_path / "out.model"
  tok.train_from_file(src, VOCAB, out, lowercase=True)
  t = tok.Tokenizer(out, max_len=8)
  assert t.vocab_size == VOCAB
  assert t.decode(t.encode(["A RED CAR"])) == ["a red car"]
  with pytest.raises(FileNotFoundError, match="missing.txt"):
    tok.train_from_file(tmp_path / "missing.txt", VOCAB, out)


def test_check_config(model_path):
  t = tok.Tokenizer(model_path, max_len=8)
  cfg = ml_collections.ConfigDict({"vocab_size": VOCAB, "eos_id": 1, "max_len": 8})
  t.check_config(cfg)
  cfg.vocab_size = VOCAB - 1
  with pytest.raises(ValueError, match="vocab_size"):
    t.check_config(cfg)
  cfg.vocab_size, cfg.eos_id = VOCAB, 2
  with pytest.raises(ValueError, match="eos_id"):
    t.check_config(cfg)


def _spm_model(path, **ids):
  with open(path, "wb") as f:
    spm.SentencePieceTrainer.train(sentence_iterator=iter(captions(300)), model_writer=f,
                                   vocab_size=VOCAB, minloglevel=2, **ids)
  return path


def test_model_without_pad_pads_with_zero(tmp_path):
  t = tok.Tokenizer(_spm_model(tmp_path / "nopad.model"), max_len=6)  # unk 0, bos 1, eos 2
  assert (t.pad_id, t.eos_id) == (0, 2)
  row = t.encode(["a cat"])[0]
  eos = int(np.flatnonzero(row == 2)[0])
  assert (row[eos + 1:] == 0).all()


def test_model_without_eos_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="noeos.model.*no EOS"):
    tok.Tokenizer(_spm_model(tmp_path / "noeos.model", eos_id=-1), max_len=6)
