"""Calibration: token rows from the grain pipeline, and one block's matmul inputs.

GPTQ and AWQ walk the stacked layers one at a time: `run_block` applies layer l to the hidden
states of the calibration rows and returns, beside its output, what each group of its weights
multiplies (the `Inputs`), so the methods can measure each weight's output error.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.data import corpus as corpus_lib
from jaxllm.data import pipeline
from jaxllm.quant.matmul import project


class Inputs(NamedTuple):
  """A block's matmul inputs, tokens flattened: `[N, D]`, `[N, H*Dh]`, `[N, D]`, `[N, F]`."""
  qkv: jax.Array  # attn_norm(x): the input of q, k, v
  o: jax.Array  # attention output before o
  gate_up: jax.Array  # mlp_norm(h): the input of gate, up
  down: jax.Array  # silu(gate) * up


def calibration_rows(tokenizer, *, paths=(), num_rows: int = 64, seq_len: int = 512,
                     seed: int = 0) -> np.ndarray:
  """`[num_rows, seq_len]` token ids packed from the training split of a text corpus (default:
  the Python standard library, as `jaxllm.train` uses), shuffled with `seed`."""
  docs = corpus_lib.build_corpus(tuple(paths), eval_fraction=0.05).train
  ds = pipeline.packed_dataset(docs, tokenizer, seq_len=seq_len, batch_size=num_rows,
                               seed=seed, shuffle=True, repeat=False)
  batch = next(iter(ds))
  rows = np.asarray(batch["inputs"], np.int32)
  if rows.shape[0] < num_rows:
    raise ValueError(f"the calibration corpus gave {rows.shape[0]} rows of {seq_len} tokens, "
                     f"fewer than the {num_rows} asked for")
  return rows


def layer_params(stacked, layer: int):
  """Layer `layer`'s slice of the stacked block params (QTensors slice too)."""
  return jax.tree.map(lambda a: a[layer], stacked)


@functools.partial(jax.jit, static_argnums=0)
def run_block(block_graphdef, params, x_BTD: jax.Array) -> tuple[jax.Array, Inputs]:
  """One block over x `[B, T, D]` (positions 0..T-1, no padding) -> (output, its Inputs)."""
  block = nnx.merge(block_graphdef, params)
  B, T, D = x_BTD.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  qkv_in = block.attn_norm(x_BTD)
  attended = block.attn.attend(qkv_in, positions, None)
  h = x_BTD + block.attn._out(attended)
  mlp_in = block.mlp_norm(h)
  hidden = block.mlp.hidden(mlp_in)
  out = h + project(hidden, block.mlp.down[...])
  flat = lambda a: a.reshape(B * T, -1)
  return out, Inputs(flat(qkv_in), flat(attended), flat(mlp_in), flat(hidden))


def embed(model_graphdef, params, tokens_BT) -> jax.Array:
  model = nnx.merge(model_graphdef, params)
  return model._embed(jnp.asarray(tokens_BT))


def block_graphdef(model_graphdef, params):
  model = nnx.merge(model_graphdef, params)
  graphdef, _ = nnx.split(model.blocks)
  return graphdef
