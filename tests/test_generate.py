"""Sampling, KV-cached generation against a recompute-everything reference, load and CLI."""

import os
import subprocess
import sys

import chex
import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxllm
from jaxllm.inference import generate as generate_lib
from jaxllm.inference import sampling
from jaxllm.model import transformer
from jaxllm.train import loop
from tests.helpers import (REPO, greedy_by_full_forward, greedy_by_recompute,
                           tiny_experiment, tiny_model)



def test_greedy_and_top_k_1_are_argmax():
  logits = jax.random.normal(jax.random.PRNGKey(0), (5, 50))
  want = jnp.argmax(logits, -1)
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    np.testing.assert_array_equal(sampling.sample(logits, key, temperature=0.0), want)
    np.testing.assert_array_equal(sampling.sample(logits, key, temperature=1.0, top_k=1), want)


def test_top_p_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda p: np.isfinite(np.asarray(sampling.filter_logits(logits, top_p=p))) & (
      np.asarray(sampling.filter_logits(logits, top_p=p)) > -1e29)
  np.testing.assert_array_equal(kept(0.4), [[True, False, False, False]])
  np.testing.assert_array_equal(kept(0.7), [[True, True, False, False]])
  np.testing.assert_array_equal(kept(0.9), [[True, True, True, False]])
  np.testing.assert_array_equal(kept(1.0), [[True, True, True, True]])


def test_sampling_follows_the_distribution():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  logits = jnp.log(jnp.asarray(probs))[None].repeat(4000, 0)
  draws = np.asarray(sampling.sample(logits, jax.random.PRNGKey(1), temperature=1.0))
  freq = np.bincount(draws, minlength=4) / len(draws)
  np.testing.assert_allclose(freq, probs, atol=0.03)
  top2 = np.asarray(sampling.sample(logits, jax.random.PRNGKey(2), temperature=1.0, top_k=2))
  assert set(np.unique(top2)) == {0, 1}
  np.testing.assert_allclose(np.mean(top2 == 0), 0.5 / 0.8, atol=0.03)


def test_cached_greedy_generation_equals_recompute():
  cfg = tiny_model()
  graphdef, params = transformer.split(transformer.create(cfg, 3))
  prompts = [[5, 9, 2, 33], [7, 1, 8, 8, 3, 10, 11, 40, 2, 6, 1, 1, 9, 20, 4, 17, 3]]
  out = generate_lib.generate(graphdef, params, prompts, max_tokens=12, temperature=0.0)
  for prompt, got in zip(prompts, out):
    assert got == greedy_by_recompute(graphdef, params, prompt, 12)


def test_seeded_sampling_is_reproducible_and_stops_at_eos():
  cfg = tiny_model()
  graphdef, params = transformer.split(transformer.create(cfg, 4))
  run = lambda seed: generate_lib.generate(graphdef, params, [[1, 2, 3]], max_tokens=20,
                                           temperature=1.0, seed=seed)[0]
  assert run(7) == run(7)
  assert run(7) != run(8)
  first = run(7)
  stopped = generate_lib.generate(graphdef, params, [[1, 2, 3]], max_tokens=20, temperature=1.0,
                                  seed=7, eos_id=first[5])[0]
  assert stopped == first[:first.index(first[5])]


def test_generation_length_is_checked():
  cfg = tiny_model(max_seq_len=32)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len 32"):
    generate_lib.generate(graphdef, params, [[1] * 20], max_tokens=20, max_seq_len=32)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gen"))
  result = loop.train(tiny_experiment(train=dict(steps=10, checkpoint_every=5)), workdir,
                      progress=False)
  return workdir, result


def test_load_workdir_and_step(trained):
  workdir, result = trained
  model = jaxllm.load(workdir)
  chex.assert_trees_all_equal(jax.device_get(model.params), jax.device_get(result["params"]))
  early = jaxllm.load(os.path.join(workdir, "checkpoints", "5"))
  assert not np.array_equal(early.params["embed"], model.params["embed"])
  ids = [model.tokenizer.bos_id, *model.tokenizer.encode("def f(x):")]
  logits = model.logits([ids])
  chex.assert_shape(logits, (1, len(ids), model.config.vocab_size))
  text = model.generate("def f(x):", max_tokens=5, temperature=0.0)
  assert text == greedy_by_full_forward(model, "def f(x):", 5)
  full = model.generate("def f(x):", max_tokens=12, temperature=0.0, details=True)
  assert full.text == model.tokenizer.decode(full.tokens) and len(full.logprobs) == 12
  stop = full.text[len(full.text) // 2:][:2]
  cut = model.generate("def f(x):", max_tokens=12, temperature=0.0, stop=[stop], details=True)
  assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
  assert model.generate("def f(x):", max_tokens=12, draft=model.draft("ngram:2")) == full.text


def test_generate_cli(trained):
  workdir, _ = trained
  proc = subprocess.run(
      [sys.executable, "-m", "jaxllm.generate", f"--checkpoint={workdir}",
       "--prompt=def fibonacci(n):", "--max_tokens=8", "--temperature=0"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  # The prompt, then the greedy continuation (reference: a full forward pass per token).
  expected = greedy_by_full_forward(jaxllm.load(workdir), "def fibonacci(n):", 8)
  assert proc.stdout.rstrip("\n") == "def fibonacci(n):" + expected.rstrip("\n")
  spec = subprocess.run(
      [sys.executable, "-m", "jaxllm.generate", f"--checkpoint={workdir}",
       "--prompt=def fibonacci(n):", "--max_tokens=8", "--temperature=0", "--cache=paged",
       "--draft=layer_skip:1", "--speculative_k=3"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert spec.returncode == 0, spec.stderr
  assert spec.stdout == proc.stdout  # greedy speculative output is the target's
  bad_draft = subprocess.run(
      [sys.executable, "-m", "jaxllm.generate", f"--checkpoint={workdir}", "--prompt=x",
       "--draft=layer_skip:9"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad_draft.returncode != 0 and "Traceback" not in bad_draft.stderr
  assert "layers=9 must be in [1, 2)" in bad_draft.stderr
  bad = subprocess.run([sys.executable, "-m", "jaxllm.generate", "--checkpoint=/no/such/dir",
                        "--prompt=x"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip() == "error: no such checkpoint: /no/such/dir"
