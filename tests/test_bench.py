"""`python -m jaxllm.bench train` prints a table, or one JSON object with --json."""

import json
import os
import subprocess
import sys

from tests.helpers import REPO

SMALL = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.head_dim=8",
         "--config.model.d_ff=64", "--config.model.vocab_size=256", "--config.train.seq_len=32",
         "--config.train.batch_size=4", "--steps=2"]


def _run(*args):
  env = {**os.environ, "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, "-m", "jaxllm.bench", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bench_train_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run("train", "--json", f"--out={out}", *SMALL)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == json.loads(out.read_text())
  assert result["suite"] == "train" and result["batch_size"] == 4 and result["seq_len"] == 32
  assert result["step_s"] > 0 and result["compile_s"] > 0
  assert abs(result["tokens_per_s"] - 4 * 32 / result["step_s"]) < 1e-6 * result["tokens_per_s"]
  assert 0 < result["mfu_vs_matmul_peer"] < 5
  assert result["mfu_vs_datasheet"] is None  # CPUs have no data-sheet peak


def test_bench_table_and_usage():
  proc = _run("train", *SMALL)
  assert proc.returncode == 0, proc.stderr
  assert "tokens/s" in proc.stdout and "MFU vs matmul peer" in proc.stdout
  bad = _run("nonsense")
  assert bad.returncode != 0 and "usage: python -m jaxllm.bench" in bad.stderr
