"""Which part of the params a train step differentiates, clips and updates.

Full training trains every weight. A model whose params hold LoRA adapters (`jaxllm.lora`)
trains their `a` and `b` alone: the base weights, float or QTensor (QLoRA), stay frozen, get no
gradient and no optimizer state. A head beside the model (`REWARD_HEAD`, a reward model's
`{"model": ..., "score": [D]}`, `jaxllm.train.reward`) trains with the adapters, as PEFT's
`modules_to_save`. The train step works on `split(params)[0]` and puts the result back with
`combine`, so one step serves both; for full training both are the identity, and a run keeps
its numbers bitwise.
"""

from __future__ import annotations

from typing import Any

from jaxllm.lora import adapters

REWARD_HEAD = "score"


def _heads(tree: dict) -> dict:
  return {REWARD_HEAD: tree[REWARD_HEAD]} if REWARD_HEAD in tree else {}


def split(params: dict) -> tuple[Any, dict | None]:
  """(trainable part, frozen rest): `(params, None)` without adapters, else
  (`{path: {"a": [*batch, *in, r], "b": [*batch, r, *out]}}` plus any head, params)."""
  if adapters.config_of(params) is None:
    return params, None
  return {**adapters.adapters(params), **_heads(params)}, params


def combine(trainable, frozen: dict | None) -> dict:
  """The params `split` came from, with `trainable` in its place."""
  if frozen is None:
    return trainable
  parts = {k: v for k, v in trainable.items() if k != REWARD_HEAD}
  return {**adapters.with_adapters(frozen, parts), **_heads(trainable)}


def trainable_params(params: dict):
  """The trainable part alone (what the optimizer state is shaped by)."""
  return split(params)[0]


def trainable_like(params: dict, tree: dict):
  """The part of `tree`, a tree shaped like `params` (their shardings, say), that
  `split(params)` trains."""
  if adapters.config_of(params) is None:
    return tree
  return {**adapters.adapters(tree), **_heads(tree)}
