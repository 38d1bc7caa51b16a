"""Reward models (`jaxllm.train.reward`) against references written here: the Bradley-Terry
loss and its gradient equal numpy's; a pair batch's rewards are each unpadded sequence's last
hidden state (a separate forward pass) dot the head; a LoRA reward model learns a preference
the base cannot see, trains its head with the adapters, leaves the base bitwise and resumes to
the same params."""

import numpy as np
import pytest

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import config as config_lib
from jaxllm.data import preference
from jaxllm.lora import adapters
from jaxllm.lora.weight import LoraWeight
from jaxllm.model import transformer
from jaxllm.quant import params as qparams
from jaxllm.train import finetune, reward, trainable
from tests.helpers import CharTokenizer, tiny_model


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_bradley_terry_loss_and_gradient_equal_numpy(margin):
  rng = np.random.default_rng(0)
  r = rng.normal(size=(6, 2)).astype(np.float32)
  loss, metrics = reward.pair_losses(jnp.asarray(r), margin)
  d = r[:, 0].astype(np.float64) - r[:, 1] - margin
  np.testing.assert_allclose(loss, np.log1p(np.exp(-d)), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(metrics["accuracy"], (r[:, 0] > r[:, 1]).astype(np.float32))
  grad = jax.grad(lambda x: jnp.sum(reward.pair_losses(x, margin)[0]))(jnp.asarray(r))
  s = 1.0 / (1.0 + np.exp(d))  # d loss / d r_chosen = -s, d / d r_rejected = +s
  np.testing.assert_allclose(grad, np.stack([-s, s], axis=1), rtol=1e-5, atol=1e-6)


def _pair(prompt, chosen, rejected):
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def test_scores_read_each_sequences_last_token():
  cfg = tiny_model(init_std=0.3)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  params = reward.init_params(params, cfg.d_model, seed=1, init_std=1.0)
  pairs = [preference.tokenize_pair(_pair("ab", "cde", "f"), CharTokenizer()),
           preference.tokenize_pair(_pair("hello there", "yes", "no thanks"), CharTokenizer())]
  rows, _ = preference.rows(pairs, 23)
  batch = preference.to_reward_batch(rows)
  assert batch["inputs"].shape == (2, 2, 24)
  got = reward.scores(graphdef, params, jax.tree.map(jnp.asarray, batch))
  model = nnx.merge(graphdef, params["model"])
  for i, pair in enumerate(pairs):
    for j, example in enumerate(pair):
      hidden, _ = model.hidden(jnp.asarray(example.ids)[None])  # alone, no padding
      want = float(hidden[0, -1].astype(jnp.float32) @ params["score"])
      np.testing.assert_allclose(float(got[i, j]), want, rtol=1e-5, atol=1e-5)


def _experiment(steps):
  return config_lib.finetune_from_config_dict({
      "name": "reward_t", "finetune": {"method": "lora", "eval_fraction": 0.0},
      "lora": {"rank": 4, "targets": ("q", "v", "up")},
      "train": {"steps": steps, "batch_size": 8, "seq_len": 16, "lr": 5e-2, "warmup_steps": 1,
                "log_every": 1, "eval_every": 100, "checkpoint_every": 3,
                "weight_decay": 0.0}})


def _data(experiment, n, seed):
  """Pairs whose chosen reply says 'yes' and rejected 'no' after a random prompt; the two
  replies are in random order in the file (the reward model must read the words)."""
  rng = np.random.default_rng(seed)
  pairs = []
  for _ in range(n):
    prompt = "".join(rng.choice(list("abcdefgh"), size=int(rng.integers(2, 8))))
    pairs.append(preference.tokenize_pair(_pair(prompt, "yes", "no"), CharTokenizer()))
  return finetune.reward_data(pairs, pairs[:8], experiment, lambda _: None)


def _fit(workdir, params, graphdef, steps, on_step=None):
  experiment = _experiment(steps)
  params = jax.tree.map(jnp.copy, params)  # fit donates what it is given
  return finetune.fit(graphdef, params, reward.objective(), _data(experiment, 48, 0),
                      str(workdir), experiment, progress=False, say=lambda _: None,
                      on_step=on_step)


class Stopped(Exception):
  """A run killed after its step-3 checkpoint."""


def _stop_at_3(step):
  if step == 3:
    raise Stopped


def test_a_lora_reward_model_learns_trains_its_head_and_resumes(tmp_path):
  cfg = tiny_model(init_std=0.3)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  start = reward.init_params(finetune.prepare_params(params, _experiment(1)), cfg.d_model)
  part, _ = trainable.split(start)
  assert set(part) == {"model/blocks/attn/q", "model/blocks/attn/v", "model/blocks/mlp/up",
                       "score"}
  held_out = _data(_experiment(1), 16, 1).eval_batches
  before, _ = reward.accuracy(graphdef, start, held_out)
  whole = _fit(tmp_path / "whole", start, graphdef, steps=6)
  after, n = reward.accuracy(graphdef, whole["params"], held_out)
  assert n == 8 and before < 0.9 and after == 1.0, (before, after)
  assert whole["eval_accuracy"] == 1.0
  assert not np.allclose(whole["params"]["score"], start["score"])  # the head trained
  trained = qparams.flatten(whole["params"]["model"])
  for path, w in qparams.flatten(start["model"]).items():  # the base did not
    unwrap = lambda x: x.base if isinstance(x, LoraWeight) else x
    np.testing.assert_array_equal(unwrap(trained[path]), unwrap(w), err_msg=path)
  with pytest.raises(Stopped):
    _fit(tmp_path / "split", start, graphdef, steps=6, on_step=_stop_at_3)
  resumed = _fit(tmp_path / "split", start, graphdef, steps=6)
  assert resumed["step"] == 6
  chex.assert_trees_all_close(trainable.split(resumed["params"])[0],
                              trainable.split(whole["params"])[0], atol=1e-6)
  assert adapters.config_of(resumed["params"]) is not None
