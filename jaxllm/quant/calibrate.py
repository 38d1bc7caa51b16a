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
from jaxllm.model import moe, transformer
from jaxllm.ops.quant_matmul import project


class Inputs(NamedTuple):
  """A block's matmul inputs, tokens flattened: `[N, D]`, `[N, H*Dh]`, `[N, D]`, `[N, F]`.

  In an MoE block `down` is each token-slot's expert hidden `[N, k, F]`, `expert_ids` `[N, k]`
  says which expert each slot ran (so each expert is calibrated on the tokens routed to it), and
  `shared_down` is the shared experts' hidden `[N, Fs]`; all three are None in a dense block
  (and `shared_down` without shared experts)."""
  qkv: jax.Array  # attn_norm(x): the input of q, k, v
  o: jax.Array  # attention output before o
  gate_up: jax.Array  # mlp_norm(h): the input of gate, up (and of the router)
  down: jax.Array  # silu(gate) * up
  expert_ids: jax.Array | None = None
  shared_down: jax.Array | None = None


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
def run_block(block_graphdef, params, x_BTD: jax.Array, depth=0) -> tuple[jax.Array, Inputs]:
  """One block, the layer at `depth`, over x `[B, T, D]` (positions 0..T-1, no padding) ->
  (output, its Inputs)."""
  block = nnx.merge(block_graphdef, params)
  B, T, D = x_BTD.shape
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  qkv_in = block.attn_input(x_BTD)
  attended = block.attn.attend(qkv_in, positions, None, depth)
  h = block.attn_residual(x_BTD, block.attn.out_projection(attended))
  mlp_in = block.mlp_input(h)
  flat = lambda a: a.reshape(B * T, -1)
  if hasattr(block, "moe"):
    out = block.mlp_residual(h, block.moe.infer(mlp_in))
    r = block.moe.route(mlp_in)
    ids = r.ids.reshape(B * T, -1)
    hidden = moe.expert_hidden(flat(mlp_in), ids, block.moe.experts())
    shared = flat(block.moe.shared.hidden(mlp_in)) if hasattr(block.moe, "shared") else None
    return out, Inputs(flat(qkv_in), flat(attended), flat(mlp_in), hidden, ids, shared)
  hidden = block.mlp.hidden(mlp_in)
  out = block.mlp_residual(h, project(hidden, block.mlp.down[...]))
  return out, Inputs(flat(qkv_in), flat(attended), flat(mlp_in), flat(hidden))


def embed(model_graphdef, params, tokens_BT) -> jax.Array:
  model = nnx.merge(model_graphdef, params)
  return model.embed_tokens(jnp.asarray(tokens_BT))


def block_graphdef(model_graphdef, params, stack: str = "blocks"):
  """The graphdef of one block of `stack` ("blocks": dense, "moe_blocks": MoE)."""
  model = nnx.merge(model_graphdef, params)
  graphdef, _ = nnx.split(getattr(model, stack))
  return graphdef


def model_config(model_graphdef, params):
  """The ModelConfig the model was built from."""
  return nnx.merge(model_graphdef, params).cfg


def layer_order(model_graphdef, params) -> list[tuple[str, int, int]]:
  """(stack, index, depth) of every layer in depth order (dense layers in `blocks`, MoE layers
  in `moe_blocks`)."""
  layout = transformer.layer_layout(model_config(model_graphdef, params))
  order = [(int(d), "blocks", j) for j, d in enumerate(layout.dense_depths())]
  order += [(int(d), "moe_blocks", j) for j, d in enumerate(layout.moe_depths())]
  return [(stack, j, d) for d, stack, j in sorted(order)]
