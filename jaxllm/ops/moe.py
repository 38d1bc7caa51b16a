"""The one grouped-matmul entry point of the MoE layers: `grouped_matmul(x, w, group_sizes)`.

x `[M, K]` holds token rows sorted by expert: the first group_sizes[0] rows belong to expert 0,
the next group_sizes[1] to expert 1, and so on; rows past sum(group_sizes) are padding and come
out as zeros. Row r of the result is x[r] @ w[e(r)] `[M, N]` for w `[E, K, N]`.

`impl`:
  xla     `jax.lax.ragged_dot`, XLA's grouped GEMM (on CPU it computes every expert over every
          row and masks: E times the useful work)
  tiled   XLA ops that copy each group's rows into tiles of `tile_rows(M, E)` rows (a group's
          last tile padded), gather one weight per tile and run one batched matmul: at most
          E tiles of padding, and a weight copy per tile; the fast path on CPU
  pallas  our kernel (`pallas_kernels.grouped_matmul`: Triton on GPU, interpreted on CPU)
  auto    tiled on CPU (2-3x the dense loop over experts there, where ragged_dot is slower than
          it: `python -m jaxllm.bench moe`), xla elsewhere (XLA's own grouped GEMM; our kernel
          has not been timed on a GPU yet, see docs/kernels.md)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import backends

IMPLS = ("auto", "xla", "tiled", "pallas")


def resolve_impl(impl: str, platform: str | None = None) -> str:
  if impl not in IMPLS:
    raise ValueError(f"unknown grouped-matmul impl {impl!r} (one of {', '.join(IMPLS)})")
  if impl == "auto":
    return "tiled" if (platform or backends.target_platform()) == "cpu" else "xla"
  return impl


def grouped_matmul(x_MK: jax.Array, w_EKN: jax.Array, group_sizes_E: jax.Array, *,
                   impl: str = "auto") -> jax.Array:
  """`[M, N]` in x's dtype, accumulated in float32 (see the module docstring)."""
  impl = resolve_impl(impl)
  w_EKN = w_EKN.astype(x_MK.dtype)
  group_sizes_E = group_sizes_E.astype(jnp.int32)
  if impl == "pallas":
    return pallas_kernels.grouped_matmul(x_MK, w_EKN, group_sizes_E,
                                         interpret=backends.target_platform() == "cpu")
  if impl == "tiled":
    return _tiled(x_MK, w_EKN, group_sizes_E)
  out = jax.lax.ragged_dot(x_MK, w_EKN, group_sizes_E, preferred_element_type=jnp.float32)
  return out.astype(x_MK.dtype)


def tile_rows(M: int, E: int) -> int:
  """Rows per tile: a power of two in [16, 512] near a quarter of a balanced group's rows, so
  the padding (under one tile per group) stays near a quarter of M."""
  target = max(M // (4 * E), 1)
  return min(512, max(16, 1 << (target.bit_length() - 1)))


def _tiled(x_MK, w_EKN, sizes_E):
  M, K = x_MK.shape
  E, _, N = w_EKN.shape
  bm = tile_rows(M, E)
  T = -(-M // bm) + E  # enough tiles for any split of M rows into E groups
  ends = jnp.cumsum(sizes_E)
  starts = ends - sizes_E
  tiles = -(-sizes_E // bm)
  first_tile = jnp.cumsum(tiles) - tiles
  rows = jnp.arange(M, dtype=jnp.int32)
  group = jnp.searchsorted(ends, rows, side="right")
  g = jnp.minimum(group, E - 1)
  slot = jnp.where(group < E, first_tile[g] * bm + rows - starts[g], T * bm)  # padding: dropped
  x_tiles = jnp.zeros((T * bm, K), x_MK.dtype).at[slot].set(x_MK, mode="drop")
  tile_group = jnp.minimum(jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(T), side="right"),
                           E - 1)
  y = jnp.einsum("tmk,tkn->tmn", x_tiles.reshape(T, bm, K), w_EKN[tile_group],
                 preferred_element_type=jnp.float32)
  return y.reshape(T * bm, N).at[slot].get(mode="fill", fill_value=0).astype(x_MK.dtype)
