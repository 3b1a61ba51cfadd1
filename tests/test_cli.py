"""The command line: user errors as one line and exit 2, defects with their traceback,
command-line overrides of every field type, and the tokenizer command on bad input."""

import os
import subprocess
import sys

import pytest

from navit_clip import cli, commands
from navit_clip.config import default_config
from navit_clip.config_loading import apply_overrides
from navit_clip.errors import MissingInputError, UserError
from navit_clip.text.tokenizer import train_from_file

NAVIT_CLIP = os.path.join(os.path.dirname(sys.executable), "navit-clip")


def _run(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run([NAVIT_CLIP, *args], capture_output=True, text=True, timeout=120,
                        env={**os.environ, **(env or {})}, cwd=cwd)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("navit-clip: error: "), proc.stderr
  return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--config.optim.lr=fast"], "--config.optim.lr='fast': expected a float"),
    (["--config.data.packer=bogus"], "config.data.packer = 'bogus'; expected one of"),
    (["--config.optim.learning_rate=1e-3"], "unknown key 'optim.learning_rate'"),
    (["--config.nosuch.lr=1"], "unknown key 'nosuch'"),
])
def test_bad_train_config_is_one_line_and_exit_2(tmp_path, args, expected):
  proc = _run("train", "--config", "demo", "--workdir", str(tmp_path / "w"), *args)
  assert expected in _one_error_line(proc)
  assert not (tmp_path / "w").exists()


def test_missing_config_file_is_one_line_and_exit_2(tmp_path):
  missing = str(tmp_path / "nope.py")
  line = _one_error_line(_run("train", "--config", missing, "--workdir", str(tmp_path)))
  assert f"config file {missing!r} does not exist" in line


def test_eval_of_a_workdir_without_checkpoints_is_one_line_and_exit_2(tmp_path):
  line = _one_error_line(_run("eval", "--workdir", str(tmp_path)))
  assert "config.json' does not exist; is" in line
  (tmp_path / "config.json").write_text("{}")
  line = _one_error_line(_run("eval", "--workdir", str(tmp_path)))
  assert f"no complete checkpoint in {tmp_path / 'checkpoints'}" in line


@pytest.mark.parametrize("flag, env", [(["--debug"], {}), ([], {"NAVIT_CLIP_DEBUG": "1"})])
def test_debug_shows_the_traceback_of_a_user_error(tmp_path, flag, env):
  proc = _run(*flag, "eval", "--workdir", str(tmp_path), env=env)
  assert proc.returncode == 2
  assert "Traceback" in proc.stderr and "MissingInputError" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("navit-clip: error: ")


@pytest.mark.parametrize("error", [KeyError("x"), ValueError("internal"), RuntimeError("x")])
def test_a_defect_keeps_its_traceback(monkeypatch, tmp_path, error):
  def broken(args, overrides):
    raise error
  monkeypatch.setattr(commands, "run_tokenizer_train", broken)
  with pytest.raises(type(error)):
    cli.main(["tokenizer", "train", "--input", "x", "--vocab-size", "8", "--out", "y"])


def test_user_errors_in_process_return_2(tmp_path, capsys):
  assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("navit-clip: error: ") and err.count("\n") == 1


def test_placeholder_fields_take_their_declared_type():
  c = default_config()
  apply_overrides(c, ["loss.init_t=1.0", "loss.init_b=-5"])
  assert c.loss.init_t == 1.0 and c.loss.init_b == -5.0
  assert isinstance(c.loss.init_b, float)
  apply_overrides(c, ["loss.init_b=2"])  # an int literal for a float field
  assert c.loss.init_b == 2.0 and isinstance(c.loss.init_b, float)
  with pytest.raises(UserError, match=r"--config.loss.init_t='warm': expected a float"):
    apply_overrides(c, ["loss.init_t=warm"])


def test_override_errors_name_the_key():
  c = default_config()
  with pytest.raises(UserError, match="expected an int, got bool"):
    apply_overrides(c, ["seed=True"])
  with pytest.raises(UserError, match="unknown key 'optim.lr'"):
    apply_overrides(c, ["optim.lr.x=1"])
  with pytest.raises(UserError, match="expected --config.KEY=VALUE"):
    apply_overrides(c, ["optim.lr"])


def test_data_commands_take_config_overrides(capsys):
  assert cli.main(["data", "inspect", "--source", "demo",
                   "--config.data.num_train_examples=4"]) == 0
  assert capsys.readouterr().out.startswith("records 4: usable 4")


def test_overrides_are_refused_where_nothing_reads_them(tmp_path):
  with pytest.raises(SystemExit) as e:
    cli.main(["tokenizer", "train", "--input", "x", "--vocab-size", "8", "--out", "y",
              "--config.seed=1"])
  assert e.value.code == 2


def test_tokenizer_on_a_non_utf8_file_names_the_file_and_offset(tmp_path):
  path = tmp_path / "captions.txt"
  path.write_bytes(b"a red car\nblue \xff\xfe sky\n")
  with pytest.raises(UserError, match=r"captions.txt' is not UTF-8 text: byte 0xff at "
                     r"offset 15"):
    train_from_file(path, 16, tmp_path / "x.model")
  line = _one_error_line(_run("tokenizer", "train", "--input", str(path), "--vocab-size",
                              "16", "--out", str(tmp_path / "x.model")))
  assert "offset 15" in line and str(path) in line
  assert not (tmp_path / "x.model").exists()


def test_tokenizer_on_a_binary_file_names_the_nul_byte(tmp_path):
  path = tmp_path / "data.bin"
  path.write_bytes(b"ok line\nab\x00cd\n")
  with pytest.raises(UserError, match=r"is not text: a NUL byte at offset 10"):
    train_from_file(path, 16, tmp_path / "x.model")
  with pytest.raises(MissingInputError, match="missing.txt"):
    train_from_file(tmp_path / "missing.txt", 16, tmp_path / "x.model")


def test_tokenizer_with_a_vocab_the_file_cannot_fill_is_one_line(tmp_path):
  path = tmp_path / "captions.txt"
  path.write_text("a red car\na blue sky\n")
  line = _one_error_line(_run("tokenizer", "train", "--input", str(path), "--vocab-size",
                              "5000", "--out", str(tmp_path / "x.model")))
  assert str(path) in line and "vocab_size = 5000 is too large" in line
  assert not (tmp_path / "x.model").exists()


def test_tokenizer_command_trains_on_crlf_text_without_carriage_returns(tmp_path, capsys):
  import sentencepiece as spm
  from navit_clip.data.sources.demo import caption_corpus
  path = tmp_path / "captions.txt"
  path.write_bytes("\r\n".join(caption_corpus(300)).encode() + b"\r\n")
  out = str(tmp_path / "x.model")
  assert cli.main(["tokenizer", "train", "--input", str(path), "--vocab-size", "40",
                   "--out", out]) == 0
  assert capsys.readouterr().out == f"wrote {out}\n"
  sp = spm.SentencePieceProcessor(model_file=out)
  assert not any("\r" in sp.id_to_piece(i) for i in range(sp.get_piece_size()))


class _FakeJax:
  """What the log filter reads of JAX in a 4-process run, as process 1."""

  class distributed:
    @staticmethod
    def is_initialized():
      return True

  @staticmethod
  def process_index():
    return 1

  @staticmethod
  def process_count():
    return 4


def _formatted(record_name: str) -> str:
  import logging
  record = logging.LogRecord(record_name, logging.INFO, __file__, 1, "hello", (), None)
  cli._ProcessPrefix().filter(record)
  return logging.Formatter(cli.LOG_FORMAT, datefmt="%H:%M:%S").format(record)


def test_log_lines_carry_the_process_index_in_multi_process_runs(monkeypatch):
  monkeypatch.delitem(sys.modules, "jax", raising=False)
  assert _formatted("navit_clip.x").endswith(" INFO navit_clip.x: hello")
  assert "[process" not in _formatted("navit_clip.x")
  monkeypatch.setitem(sys.modules, "jax", _FakeJax)
  assert _formatted("navit_clip.x").endswith(" [process 1/4] INFO navit_clip.x: hello")
