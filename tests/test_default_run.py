"""The README's main job, end to end: the default experiment on this machine's stdlib.

Slow (minutes): runs in CI (CI=true) and with `pytest --slow`.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO



@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_default_training_reaches_half_log_vocab_and_generates_python(tmp_path):
  workdir = tmp_path / "tiny"
  env = {**os.environ, "XLA_FLAGS": ""}  # the real default: one CPU device
  train = subprocess.run([sys.executable, "-m", "jaxllm.train", f"--workdir={workdir}",
                          "--noprogress"], cwd=REPO, env=env, capture_output=True, text=True,
                         # 500 steps of 16 x 128 tokens: about 5 minutes at 0.5 s/step
                         # alone (2026-12-06), more beside the other pytest worker
                         timeout=1800)
  assert train.returncode == 0, train.stderr[-2000:]
  config = json.loads((workdir / "config.json").read_text())
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in rows if "eval_loss" in r]
  assert evals[-1]["step"] == config["train"]["steps"]
  target = math.log(config["model"]["vocab_size"]) / 2
  assert evals[-1]["eval_loss"] < target, (evals[-1], target)
  # The README's command (default sampling), over a few seeds. What makes 64 tokens of a
  # 3.7M-parameter model "look like Python": the def's body starts on an indented new line and
  # Python tokens appear (a docstring's quotes count: that is what such a model writes first).
  python_tokens = ('"""', "def ", "return", "if ", "self", "for ", "import", " = ", "(", "None")
  for seed in range(3):
    gen = subprocess.run([sys.executable, "-m", "jaxllm.generate", f"--checkpoint={workdir}",
                          "--prompt=def fibonacci(n):", "--max_tokens=64", f"--seed={seed}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    continuation = gen.stdout[len("def fibonacci(n):"):]
    assert continuation.startswith("\n    "), continuation
    assert any(t in continuation for t in python_tokens), continuation
