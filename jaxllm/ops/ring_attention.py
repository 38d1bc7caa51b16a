"""Ring attention for context parallelism (`train.context_parallel=ring`).

Each device on the mesh's `context` axis holds a slice of every row's sequence: its queries and
their keys and values `[B, T / C, ...]`. Key/value blocks travel around the ring with
`ppermute`, one hop per step; each device attends its queries to the block it holds and merges
the partial results through their log-sum-exp, so no device ever holds the whole sequence's
keys. Masking goes by token index (`q_index`, `kv_index` travel with the blocks), so any
assignment of tokens to devices works; `load_balance_order` gives the one where causal
masking leaves every device the same work (device i holds chunks i and 2C - 1 - i).

Two ways to attend to a block. `ring_attention` runs the XLA path (scores per block
`[B, H, T/C, T/C]`), each under `jax.checkpoint`: the backward pass recomputes a block's scores
from its inputs instead of keeping C blocks of them per layer; it takes any token order, sliding
windows and ALiBi. `ring_flash_attention` runs our flash kernel on every block and needs the
load-balanced order, where which pairs are visible follows from the chunks' places alone (no
per-token index reaches the kernel). Either way the gradient flows through the ring by JAX's
transpose of `ppermute`, and through each block's log-sum-exp into its attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from jaxllm.ops.attention_mask import masked_scores


def load_balance_order(T: int, C: int) -> np.ndarray:
  """`[T]` token indices in the order that gives device i (of C) chunks i and 2C - 1 - i of
  2C equal chunks: under causal masking each device then sees as many unmasked pairs."""
  if T % (2 * C):
    raise ValueError(f"sequence length {T} must be a multiple of 2 x context ({2 * C})")
  chunks = np.arange(T).reshape(2 * C, T // (2 * C))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * C - 1 - i]]) for i in range(C)])


@functools.partial(jax.checkpoint, static_argnums=(7, 8, 10))
def _block(q, k, v, q_index, kv_index, q_seg, kv_seg, sliding_window, sm_scale, alibi_slopes,
           logit_soft_cap=0.0):
  """Attention of q `[B, T, H, Dh]` to one K/V block `[B, S, K, Dh]` ->
  (out `[B, T, H, Dh]` float32 normalised within the block, lse `[B, H, T]` float32)."""
  B, T, H, Dh = q.shape
  s = masked_scores(q, k, q_index=q_index, kv_index=kv_index, q_segment_ids=q_seg,
                    kv_segment_ids=kv_seg, sliding_window=sliding_window, sm_scale=sm_scale,
                    alibi_slopes=alibi_slopes, logit_soft_cap=logit_soft_cap)
  m = jnp.max(s, axis=-1)
  p = jnp.exp(s - m[..., None])
  l = jnp.sum(p, axis=-1)
  out = jnp.einsum("bkgts,bskd->btkgd", p / l[..., None], v.astype(jnp.float32))
  return out.reshape(B, T, H, Dh), (m + jnp.log(l)).reshape(B, H, T)


def _merge(out, lse, out_b, lse_b):
  """Attention over two disjoint key sets from each one's normalised output `[B, T, H, Dh]` and
  log-sum-exp `[B, H, T]` (float32): the outputs weighted by their share of the total mass."""
  new = jnp.logaddexp(lse, lse_b)
  weight = lambda l: jnp.exp(l - new).transpose(0, 2, 1)[..., None]  # [B, T, H, 1]
  return out * weight(lse) + out_b * weight(lse_b), new


def ring_attention(q, k, v, *, q_index, kv_index, segment_ids=None, sliding_window=None,
                   sm_scale=None, alibi_slopes=None, axis: str = "context",
                   logit_soft_cap: float = 0.0):
  """Causal self-attention of this device's slice, inside a `shard_map` over `axis`: q
  `[B, T, H, Dh]`, k/v `[B, T, K, Dh]`, q_index = kv_index `[B, T]` the tokens' indices in the
  whole sequence, segment_ids `[B, T]` or None. Returns q's shape and dtype."""
  n = jax.lax.axis_size(axis)
  ring = [(i, (i + 1) % n) for i in range(n)]
  block = (k, v, kv_index, segment_ids)
  out, lse = None, None
  for step in range(n):
    if step:
      block = jax.tree.map(lambda x: jax.lax.ppermute(x, axis, ring), block)
    kb, vb, kvi, kvs = block
    o_b, lse_b = _block(q, kb, vb, q_index, kvi, segment_ids, kvs, sliding_window, sm_scale,
                        alibi_slopes, logit_soft_cap)
    out, lse = (o_b, lse_b) if out is None else _merge(out, lse, o_b, lse_b)
  return out.astype(q.dtype)


def ring_flash_attention(q, k, v, *, segment_ids=None, sm_scale=None, axis: str = "context",
                         interpret: bool = False):
  """Causal self-attention of this device's slice through the flash kernel, inside a
  `shard_map` over `axis`: q `[B, T, H, Dh]`, k/v `[B, T, K, Dh]`, segment_ids `[B, T]` or None.
  The tokens must come in `load_balance_order`: device i holds chunks a = i and b = 2C - 1 - i
  (c = T / 2 tokens each, in order). Returns q's shape and dtype.

  Its own keys: plain causal attention over [a; b] (a precedes b, so local order is causal
  order). The block of device j != i holds chunks j and 2C - 1 - j; for j < i both of i's
  chunks see all of chunk j and nothing of the other, for j > i only chunk b sees anything, and
  all of both. Either way one kernel call of 2c x c pairs, none masked by position: every
  device does the same work at every step.
  """
  B, T, H, Dh = q.shape
  c = T // 2
  n = jax.lax.axis_size(axis)
  me = jax.lax.axis_index(axis)
  ring = [(i, (i + 1) % n) for i in range(n)]
  flash = functools.partial(pallas_kernels.flash_attention, sm_scale=sm_scale,
                            interpret=interpret, return_lse=True)
  seg = segment_ids
  out, lse = flash(q, k, v, causal=True, segment_ids=seg)
  out = out.astype(jnp.float32)
  block = (k, v, seg)
  for step in range(1, n):
    block = jax.tree.map(lambda x: jax.lax.ppermute(x, axis, ring), block)
    kb, vb, kv_seg = block

    def from_earlier(kb=kb, vb=vb, kv_seg=kv_seg):  # chunk j, seen whole by both chunks
      o, l = flash(q, kb[:, :c], vb[:, :c], causal=False, segment_ids=seg,
                   kv_segment_ids=None if seg is None else kv_seg[:, :c])
      return o.astype(jnp.float32), l

    def from_later(kb=kb, vb=vb, kv_seg=kv_seg):  # both chunks, seen whole by chunk b alone
      o, l = flash(q[:, c:], kb, vb, causal=False,
                   segment_ids=None if seg is None else seg[:, c:], kv_segment_ids=kv_seg)
      nothing = jnp.zeros((B, c, H, Dh), jnp.float32)
      return (jnp.concatenate([nothing, o.astype(jnp.float32)], axis=1),
              jnp.concatenate([jnp.full((B, H, c), -jnp.inf), l], axis=2))

    # This step's block comes from device me - step: an earlier one unless the ring wrapped.
    o_b, lse_b = jax.lax.cond(me >= step, from_earlier, from_later)
    out, lse = _merge(out, lse, o_b, lse_b)
  return out.astype(q.dtype)
