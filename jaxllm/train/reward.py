"""Reward models: a scalar score of a whole sequence, trained on chosen/rejected pairs.

The score is the language model's final hidden state (`Transformer.hidden`, after the final
norm) at the sequence's last token, times a learned vector `score` `[D]`: Hugging Face's
`...ForSequenceClassification` with one label, whose `score.weight` `[1, D]` it is. Params are
`{"model": the language model's params (LoRA adapters too), "score": [D]}`; the head trains
with the adapters (`jaxllm.train.trainable.REWARD_HEAD`, PEFT's `modules_to_save`).

The Bradley-Terry loss of a pair with rewards r_c (chosen) and r_r (rejected) is
  -log s(r_c - r_r - m)   (m: `margin`, 0 unless given)
the negative log-likelihood that the chosen reply is preferred; metrics are its mean, the
accuracy (r_c > r_r) and the mean rewards and margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.train.step import Objective
from jaxllm.train.trainable import REWARD_HEAD as HEAD

INPUT_KEYS = ("inputs", "positions", "segment_ids", "last")


def init_params(model_params: dict, d_model: int, seed: int = 0,
                init_std: float = 0.02) -> dict:
  """`{"model": model_params, "score": [D]}` with the head drawn from N(0, init_std^2), as
  Hugging Face initialises a classification head."""
  head = init_std * jax.random.normal(jax.random.PRNGKey(seed), (d_model,), jnp.float32)
  return {"model": model_params, HEAD: head}


def is_reward_params(params) -> bool:
  return isinstance(params, dict) and HEAD in params and "model" in params


def scores(graphdef, params: dict, batch: dict) -> jax.Array:
  """Rewards `[B, 2]` of a `[B, 2, T]` pair batch (`data.preference.to_reward_batch`): each
  sequence's final hidden state at its last token (`last` `[B, 2]`) dot the head, float32."""
  B, _, T = batch["inputs"].shape
  flat = {k: batch[k].reshape(2 * B, *batch[k].shape[2:]) for k in INPUT_KEYS}
  return sequence_scores(graphdef, params, flat).reshape(B, 2)


def sequence_scores(graphdef, params: dict, batch: dict) -> jax.Array:
  """Rewards `[N]` of `[N, T]` rows (inputs, positions, segment_ids; `last` `[N]` each row's
  last token): its final hidden state there dot the head, float32."""
  N = batch["inputs"].shape[0]
  hidden, _ = nnx.merge(graphdef, params["model"]).hidden(batch["inputs"], batch["positions"],
                                                          batch["segment_ids"])
  last_D = hidden[jnp.arange(N), jnp.maximum(batch["last"], 0)].astype(jnp.float32)
  return last_D @ params[HEAD].astype(jnp.float32)


def pair_losses(rewards: jax.Array, margin: float = 0.0
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(Bradley-Terry loss `[B]`, metrics {name: `[B]`}) from (chosen, rejected) rewards
  `[B, 2]`."""
  diff = rewards[:, 0] - rewards[:, 1]
  loss = -jax.nn.log_sigmoid(diff - margin)
  return loss, {"loss": loss, "accuracy": (diff > 0).astype(jnp.float32),
                "reward_chosen": rewards[:, 0], "reward_rejected": rewards[:, 1],
                "reward_margin": diff}


def objective(margin: float = 0.0) -> Objective:
  """The Bradley-Terry loss as a train-step objective over reward pair batches; its weight is
  the number of real pairs (a held-out batch's padding pairs count 0)."""
  def loss(graphdef, params, batch, _extra=None):
    losses, metrics = pair_losses(scores(graphdef, params, batch), margin)
    real = (batch["segment_ids"][:, 0, 0] > 0).astype(jnp.float32)
    sums = {k: jnp.sum(v * real) for k, v in metrics.items()}
    return jnp.sum(losses * real), (jnp.sum(real), sums, None)
  return Objective(loss, weight_name="pairs")


def accuracy(graphdef, params: dict, batches: list[dict]) -> tuple[float, int]:
  """(fraction of real pairs whose chosen reply scores higher, how many pairs) over
  `batches`."""
  fn = jax.jit(lambda p, b: scores(graphdef, p, b))
  right = n = 0
  for b in batches:
    r = np.asarray(fn(params, {k: jnp.asarray(b[k]) for k in INPUT_KEYS}))
    real = np.asarray(b["segment_ids"])[:, 0, 0] > 0
    right += int(np.sum((r[:, 0] > r[:, 1]) & real))
    n += int(real.sum())
  return right / max(n, 1), n


def save_head(path: str, params: dict) -> None:
  """The head as `score.weight` `[1, D]` float32 in a safetensors file (Hugging Face's name
  and layout for a one-label classification head)."""
  from safetensors.numpy import save_file
  save_file({"score.weight": np.asarray(params[HEAD], np.float32)[None, :]}, path)


def load_head(path: str) -> jax.Array:
  """The `[D]` head `save_head` (or `export_hf`) wrote."""
  from safetensors.numpy import load_file
  return jnp.asarray(load_file(path)["score.weight"][0])


def export_hf(dst: str, config, params: dict, tokenizer) -> None:
  """The reward model `{"model", "score"}` (LoRA adapters merged in) as a Hugging Face
  `...ForSequenceClassification` directory with one label: the causal model's export with
  the architecture renamed, `lm_head` dropped and `score.weight` `[1, D]` added.
  `transformers.AutoModelForSequenceClassification` scores the last token that is not
  `pad_token_id`: the tokenizer's pad where it has its own, else unset (then it takes one
  sequence per call, or sequences of equal length)."""
  import json
  import os

  from safetensors.numpy import load_file, save_file

  from jaxllm.checkpoint import convert
  from jaxllm.lora import adapters
  model_params = jax.tree.map(np.asarray, adapters.merge(params["model"]))
  convert.export_hf(convert.Checkpoint(config, model_params, tokenizer, "reward"), dst)
  cfg_path = os.path.join(dst, "config.json")
  with open(cfg_path) as f:
    hf = json.load(f)
  hf["architectures"] = [a.replace("ForCausalLM", "ForSequenceClassification")
                         for a in hf["architectures"]]
  # A pad that is the EOS would hide a reply's own end token, which this model scores.
  pad = getattr(tokenizer, "pad_id", -1)
  pad = pad if pad is not None and pad >= 0 and pad != tokenizer.eos_id else None
  hf.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
            pad_token_id=pad)
  with open(cfg_path, "w") as f:
    json.dump(hf, f, indent=2)
  weights = os.path.join(dst, "model.safetensors")
  state = {k: v for k, v in load_file(weights).items() if k != "lm_head.weight"}
  state["score.weight"] = np.asarray(params[HEAD], np.float32)[None, :]
  mode = os.stat(weights).st_mode
  save_file(state, weights, metadata={"format": "pt"})
  os.chmod(weights, mode)
