"""The grouped matmul in plain jnp: each group's rows times its own weight, one einsum over a
row-to-group one-hot (E times the work; a reference, not a fast path)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_groups(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """`[M]` int32: the group of each row; rows past sum(group_sizes) get len(group_sizes)."""
  ends = jnp.cumsum(group_sizes)
  return jnp.searchsorted(ends, jnp.arange(num_rows), side="right").astype(jnp.int32)


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
  """x `[M, K]` rows sorted by group, w `[E, K, N]` -> `[M, N]` (x's dtype, float32 math);
  rows past sum(group_sizes) are zero."""
  E = w.shape[0]
  onehot = jax.nn.one_hot(row_groups(group_sizes, x.shape[0]), E, dtype=jnp.float32)
  y = jnp.einsum("mk,ekn,me->mn", x.astype(jnp.float32), w.astype(jnp.float32), onehot,
                 precision=jax.lax.Precision.HIGHEST)
  return y.astype(x.dtype)
