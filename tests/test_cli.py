"""The `jaxllm` command and what every entry point shares: `--help` (status 0, the command's
own and shared flags) and usage errors in one line."""

import os
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, xla_flags


def _run(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300,
                        env={**os.environ, "XLA_FLAGS": xla_flags(devices=1)})


def test_help_exits_0_with_the_commands_and_the_shared_flags():
  generate = _run("jaxllm.generate", "--help")
  assert generate.returncode == 0, generate.stderr
  out = generate.stdout
  assert out.startswith("`python -m jaxllm.generate --checkpoint=PATH")  # its docstring
  flags_at, shared_at = out.index("\nflags:\n"), out.index("\nshared flags:\n")
  assert flags_at < out.index("  --checkpoint:") < shared_at  # its own flags
  assert shared_at < out.index("  --mesh:") and "  --coordinator_address:" in out
  assert "--helpfull" in out and "--[no]logtostderr" not in out  # absl's stay in --helpfull
  train = _run("jaxllm.train", "-h")
  assert train.returncode == 0 and "  --workdir:" in train.stdout
  assert "  --config:" in train.stdout


def test_serve_refuses_a_busy_port_before_loading_the_model():
  pytest.importorskip("uvicorn")
  with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    # The checkpoint does not exist: the port is what it reports, so it looked there first.
    proc = _run("jaxllm.serve", "--checkpoint=/no/such/model", f"--port={port}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: cannot listen on 127.0.0.1:{port}: Address already in use")


def test_usage_errors_say_what_is_wrong_in_one_line():
  extra = _run("jaxllm.generate", "--checkpoint=x", "--prompt=hi", "stray")
  assert extra.returncode == 2
  assert extra.stderr.strip().splitlines()[-1] == "error: unexpected arguments: stray"
  assert "Traceback" not in extra.stderr and "flags:" not in extra.stderr
  neither = _run("jaxllm.eval", "--checkpoint=x")
  assert neither.returncode == 2 and neither.stderr.strip().splitlines()[-1].endswith(
      "give one of --data (text to score) and --choices (multiple-choice items)")
  bad_item = _run("jaxllm.eval", "--checkpoint=x", "--choices=README.md")  # read before loading
  assert bad_item.returncode == 2 and bad_item.stderr.strip().splitlines()[-1].startswith(
      "error: --choices: README.md:1: not JSON")
  two = _run("jaxllm.data", "--data=x", "prepare", "packing")
  assert two.returncode == 2
  assert two.stderr.strip().splitlines()[-1] == "error: one command expected, got: prepare packing"


def test_the_jaxllm_command_runs_each_entry_point():
  # The console script pip installs (pyproject's [project.scripts]) beside this Python.
  script = os.path.join(os.path.dirname(sys.executable), "jaxllm")
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices=1)}
  run = lambda *args: subprocess.run([script, *args], cwd=REPO, capture_output=True, text=True,
                                     timeout=300, env=env)
  listing = run("--help")
  assert listing.returncode == 0
  for command in ("train", "generate", "serve", "eval", "quantize", "convert", "bench", "data"):
    assert f"\n  {command} " in listing.stdout, command
  # A command is its module: the same one-line error as `python -m jaxllm.fetch gpt-17`.
  fetch = run("fetch", "gpt-17")
  assert fetch.returncode == 2
  assert fetch.stderr.strip() == "error: unknown model 'gpt-17' (one of: smollm2-135m)"
  train_help = run("train", "--help")
  assert train_help.returncode == 0 and "  --workdir:" in train_help.stdout
  typo = _run("jaxllm", "trian")  # python -m jaxllm is the same command
  assert typo.returncode == 2 and typo.stderr.startswith("error: unknown command 'trian' (one of:")


# One vocabulary across the commands; each renamed flag keeps its old spelling.
RENAMED = {
    "jaxllm.convert": "--src (--checkpoint), --dst (--out)",
    "jaxllm.generate": "--k (--speculative_k)",
    "jaxllm.eval": "--max_len (--max_seq_len)",
    "jaxllm.plan": "--serve_batch (--max_slots), --serve_len (--max_seq_len)",
    "jaxllm.bench": "--k (--speculative_k), --serve_draft (--draft)",
    "jaxllm.data": "--src (--data)",
}


def test_renamed_flags_keep_their_old_spelling_with_a_note():
  for module, old in RENAMED.items():
    shown = _run(module, "--help")
    assert shown.returncode == 0 and f"old spellings, still accepted: {old}\n" in shown.stdout, (
        module, shown.stdout[-500:])
  # The old spelling sets the new flag (the error names it) and says the new name.
  proc = _run("jaxllm.eval", "--checkpoint=x", "--data=README.md", "--max_len=8", "--stride=9")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-2:] == [
      "note: --max_len is now --max_seq_len (the old spelling still works)",
      "error: --stride=9 must be below --max_seq_len=8"]


def test_every_user_error_shares_one_base_and_keeps_its_builtin_type():
  """The commands print `jaxllm.errors.UserError` as one line (`common.user_errors`; the CLI
  tests here show it per command): each layer's error derives from it, and stays the
  ValueError / RuntimeError its library callers catch."""
  from jaxllm.checkpoint.errors import UnsupportedCheckpoint
  from jaxllm.checkpoint.orbax import CheckpointError
  from jaxllm.config import ConfigError
  from jaxllm.data.corpus import CorpusError
  from jaxllm.errors import UserError
  from jaxllm.lora.peft_format import AdapterError
  from jaxllm.train.loop import TrainingDiverged
  for error, builtin in ((ConfigError, ValueError), (CorpusError, ValueError),
                         (UnsupportedCheckpoint, ValueError), (AdapterError, ValueError),
                         (CheckpointError, RuntimeError), (TrainingDiverged, RuntimeError)):
    assert issubclass(error, UserError) and issubclass(error, builtin), error
