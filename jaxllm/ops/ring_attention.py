"""Ring attention for context parallelism (`train.context_parallel=ring`).

Each device on the mesh's `context` axis holds a slice of every row's sequence: its queries and
their keys and values `[B, T / C, ...]`. Key/value blocks travel around the ring with
`ppermute`, one hop per step; each device attends its queries to the block it holds and merges
the partial results through their log-sum-exp, so no device ever holds the whole sequence's
keys. Masking goes by token index (`q_index`, `kv_index` travel with the blocks), so any
assignment of tokens to devices works; `load_balance_order` gives the one where causal
masking leaves every device the same work (device i holds chunks i and 2C - 1 - i).

Blocks run through the XLA path (scores per block `[B, H, T/C, T/C]`), each under
`jax.checkpoint`: the backward pass recomputes a block's scores from its inputs, as a flash
kernel would, instead of keeping C blocks of them per layer. The gradient flows through the
ring by JAX's transpose of `ppermute`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops.attention import masked_scores


def load_balance_order(T: int, C: int) -> np.ndarray:
  """`[T]` token indices in the order that gives device i (of C) chunks i and 2C - 1 - i of
  2C equal chunks: under causal masking each device then sees as many unmasked pairs."""
  if T % (2 * C):
    raise ValueError(f"sequence length {T} must be a multiple of 2 x context ({2 * C})")
  chunks = np.arange(T).reshape(2 * C, T // (2 * C))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * C - 1 - i]]) for i in range(C)])


@functools.partial(jax.checkpoint, static_argnums=(7, 8))
def _block(q, k, v, q_index, kv_index, q_seg, kv_seg, sliding_window, sm_scale, alibi_slopes):
  """Attention of q `[B, T, H, Dh]` to one K/V block `[B, S, K, Dh]` ->
  (out `[B, T, H, Dh]` float32 normalised within the block, lse `[B, K, G, T]` float32)."""
  B, T, H, Dh = q.shape
  s = masked_scores(q, k, q_index=q_index, kv_index=kv_index, q_segment_ids=q_seg,
                    kv_segment_ids=kv_seg, sliding_window=sliding_window, sm_scale=sm_scale,
                    alibi_slopes=alibi_slopes)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", p / l[..., None], v.astype(jnp.float32))
  return out.reshape(B, T, H, Dh), m + jnp.log(l)


def ring_attention(q, k, v, *, q_index, kv_index, segment_ids=None, sliding_window=None,
                   sm_scale=None, alibi_slopes=None, axis: str = "context"):
  """Causal self-attention of this device's slice, inside a `shard_map` over `axis`: q
  `[B, T, H, Dh]`, k/v `[B, T, K, Dh]`, q_index = kv_index `[B, T]` the tokens' indices in the
  whole sequence, segment_ids `[B, T]` or None. Returns q's shape and dtype."""
  B, T, H, Dh = q.shape
  n = jax.lax.axis_size(axis)
  ring = [(i, (i + 1) % n) for i in range(n)]
  block = (k, v, kv_index, segment_ids)
  out, lse = None, None
  for step in range(n):
    if step:
      block = jax.tree.map(lambda x: jax.lax.ppermute(x, axis, ring), block)
    kb, vb, kvi, kvs = block
    o_b, lse_b = _block(q, kb, vb, q_index, kvi, segment_ids, kvs, sliding_window, sm_scale,
                        alibi_slopes)
    if out is None:
      out, lse = o_b, lse_b
      continue
    new = jnp.logaddexp(lse, lse_b)
    w_old = jnp.exp(lse - new).reshape(B, H, T).transpose(0, 2, 1)[..., None]
    w_new = jnp.exp(lse_b - new).reshape(B, H, T).transpose(0, 2, 1)[..., None]
    out, lse = out * w_old + o_b * w_new, new
  return out.astype(q.dtype)
