"""`grouped_matmul(x, w, group_sizes)`: the MoE experts' matmul, differentiable.

x `[M, K]` holds rows sorted by group: the first group_sizes[0] rows use w[0], the next
group_sizes[1] rows w[1], ...; rows past sum(group_sizes) are padding and come out as zeros.
w `[E, K, N]`. Same contract as `jax.lax.ragged_dot`. The backward pass reuses the forward
kernel for dx = dy wᵀ and a transposed kernel for dw[g] = x_gᵀ dy_g (see `gpu.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.grouped_matmul import gpu


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16) and Triton launch settings."""
  block_m: int = 64
  block_n: int = 128
  block_k: int = 64
  num_warps: int = 4
  num_stages: int = 3


class WorkList(NamedTuple):
  """Per work item (at most Mp / block_m + E): its group (E: the zero tail, E + 1: idle) and
  row tile; per group g <= E: its rows [starts[g], ends[g]) and row tiles
  [first_tile[g], stop_tile[g]) (the tail is group E)."""
  item_group: jax.Array
  item_tile: jax.Array
  starts: jax.Array
  ends: jax.Array
  first_tile: jax.Array
  stop_tile: jax.Array


def work_list(group_sizes: jax.Array, padded_rows: int, block_m: int) -> WorkList:
  """The (group, row tile) items of a grouped matmul over `padded_rows` rows (jnp, jittable)."""
  E = group_sizes.shape[0]
  sizes = jnp.concatenate([group_sizes.astype(jnp.int32),
                           (padded_rows - jnp.sum(group_sizes)).astype(jnp.int32)[None]])
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // block_m
  stop = jnp.where(sizes > 0, (ends - 1) // block_m + 1, first)
  count = stop - first
  cum = jnp.cumsum(count)
  num_tiles = padded_rows // block_m
  items = jnp.arange(num_tiles + E, dtype=jnp.int32)
  group = jnp.searchsorted(cum, items, side="right").astype(jnp.int32)  # E + 1 past the end
  g = jnp.minimum(group, E)
  tile = jnp.clip(first[g] + items - (cum[g] - count[g]), 0, num_tiles - 1)
  return WorkList(group, tile.astype(jnp.int32), starts, ends, first, stop)


def _fit(block: int, dim: int) -> int:
  """The largest power of two <= block dividing dim."""
  b = block
  while b > 16 and dim % b:
    b //= 2
  return b


def _check(x, w, group_sizes):
  if x.ndim != 2 or w.ndim != 3 or x.shape[1] != w.shape[1]:
    raise ValueError(f"grouped_matmul needs x [M, K] and w [E, K, N]; got x {x.shape}, "
                     f"w {w.shape}")
  if group_sizes.shape != (w.shape[0],) or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"group_sizes {group_sizes.shape} {group_sizes.dtype} must be integers "
                     f"[E={w.shape[0]}]")
  K, N = w.shape[1:]
  if K % 16 or N % 16:
    raise ValueError(f"grouped_matmul needs K and N multiples of 16; w is {w.shape}")
  if x.dtype != w.dtype:
    raise ValueError(f"x {x.dtype} and w {w.dtype} must have one dtype")


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   block_sizes: BlockSizes | None = None, backend: str | None = None,
                   interpret: bool = False) -> jax.Array:
  """x `[M, K]` (rows sorted by group) times w `[E, K, N]` per group -> `[M, N]` in x's dtype
  (float32 accumulation). Differentiable in x and w. On CPU pass interpret=True."""
  _check(x, w, group_sizes)
  if backends.resolve(backend, interpret) != "gpu":
    raise ValueError("grouped_matmul has a GPU (Triton) lowering only; on TPU use "
                     "jax.lax.ragged_dot (XLA's grouped matmul)")
  return _grouped_matmul(x, w, group_sizes.astype(jnp.int32), block_sizes or BlockSizes(),
                         interpret)


def _settings(bs: BlockSizes, K: int, N: int):
  return dict(block_m=bs.block_m, block_n=_fit(bs.block_n, N), block_k=_fit(bs.block_k, K),
              num_warps=bs.num_warps, num_stages=bs.num_stages)


def _padded(x, block_m):
  M = x.shape[0]
  Mp = -(-M // block_m) * block_m
  return (x if Mp == M else jnp.pad(x, ((0, Mp - M), (0, 0)))), Mp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _grouped_matmul(x, w, group_sizes, bs: BlockSizes, interpret: bool):
  return _forward(x, w, group_sizes, bs, interpret)[0]


def _forward(x, w, group_sizes, bs, interpret):
  M = x.shape[0]
  xp, Mp = _padded(x, bs.block_m)
  work = work_list(group_sizes, Mp, bs.block_m)
  out = gpu.gmm(xp, w, work, transpose_rhs=False, interpret=interpret,
                **_settings(bs, w.shape[1], w.shape[2]))
  return out[:M], (xp, w, work)


def _bwd(bs, interpret, residuals, dy):
  xp, w, work = residuals
  M = dy.shape[0]
  dyp, _ = _padded(dy.astype(xp.dtype), bs.block_m)
  K, N = w.shape[1:]
  # dx[r] = dy[r] @ w[g(r)]ᵀ: the forward kernel with the weight read transposed.
  dx = gpu.gmm(dyp, w, work, transpose_rhs=True, interpret=interpret, **_settings(bs, N, K))
  dw = gpu.tgmm(xp, dyp, work, w.shape[0], interpret=interpret, out_dtype=w.dtype,
                **_settings(bs, K, N))
  return dx[:M], dw, None


_grouped_matmul.defvjp(_forward, _bwd)
