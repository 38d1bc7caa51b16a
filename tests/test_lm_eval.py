"""lm-evaluation-harness drives our server (its `local-completions` model, the server's own
tokenizer through /tokenize) on the repository's tasks, examples/lm_eval/: its loglikelihood
scores equal `python -m jaxllm.eval --choices`'s, and its generate_until answers equal
jaxllm's greedy generation. The harness is a test peer (the parity extra); the model is the
tiny random one with SmolLM2's tokenizer, whose answers are as good as any for equality.
"""

import json
import os
import subprocess
import sys

import pytest
import yaml

lm_eval = pytest.importorskip("lm_eval")
from tests.helpers import REPO, xla_flags  # noqa: E402
from tests.test_server import NAME, _serving  # noqa: E402

TASKS = os.path.join(REPO, "examples", "lm_eval")


def _task(name: str) -> dict:
  """The task's YAML with its data file found from anywhere (it names it from the repo root)."""
  with open(os.path.join(TASKS, f"{name}.yaml")) as f:
    config = yaml.safe_load(f)
  config["dataset_kwargs"]["data_files"]["test"] = os.path.join(TASKS, f"{name}.jsonl")
  return config


@pytest.fixture(scope="module")
def harness_run(tiny_chat_model):
  """The harness's results and samples for both tasks against a live server."""
  with _serving(tiny_chat_model) as (base, _, engine, _):
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={NAME},base_url={base}/v1/completions,tokenizer_backend=remote,"
                   "num_concurrent=4,max_retries=1",
        tasks=[_task("choices"), _task("answers")], log_samples=True)
    assert engine.failure is None
  return out


def test_loglikelihood_scores_equal_jaxllm_eval(harness_run, tiny_chat_model):
  import jaxllm
  from jaxllm.eval import choices
  cli = subprocess.run(
      [sys.executable, "-m", "jaxllm.eval", f"--checkpoint={tiny_chat_model}",
       f"--choices={os.path.join(TASKS, 'choices.jsonl')}"], cwd=REPO, capture_output=True,
      text=True, timeout=300, env={**os.environ, "XLA_FLAGS": xla_flags(devices=1)})
  assert cli.returncode == 0, cli.stderr
  ours = json.loads(cli.stdout.strip().splitlines()[-1])
  theirs = harness_run["results"]["jaxllm_choices"]
  assert ours["n"] == theirs["sample_len"] == 24
  assert ours["acc"] == pytest.approx(theirs["acc,none"])
  assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"])
  # Item by item, choice by choice: the same loglikelihoods (batched differently).
  items = choices.read_items(os.path.join(TASKS, "choices.jsonl"))
  want = choices.score(jaxllm.load(tiny_chat_model), items)["loglikelihoods"]
  samples = sorted(harness_run["samples"]["jaxllm_choices"], key=lambda s: s["doc_id"])
  got = [[resp[0][0] for resp in s["resps"]] for s in samples]
  assert got == [pytest.approx(w, abs=1e-3) for w in want]


def test_generate_until_answers_equal_greedy_generation(harness_run, tiny_chat_model):
  import jaxllm
  model = jaxllm.load(tiny_chat_model)
  samples = sorted(harness_run["samples"]["jaxllm_answers"], key=lambda s: s["doc_id"])
  with open(os.path.join(TASKS, "answers.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert len(samples) == len(records) == 12
  until = ("\n", ".", model.tokenizer.decode([model.tokenizer.eos_id]))
  for s, record in zip(samples, records):
    text = model.generate([model.tokenizer.encode(record["prompt"])], max_tokens=8,
                          temperature=0.0, details=True)[0].text
    cut = min((text.index(u) for u in until if u in text), default=len(text))
    assert s["resps"][0][0] == text[:cut], record
  assert "exact_match,none" in harness_run["results"]["jaxllm_answers"]
