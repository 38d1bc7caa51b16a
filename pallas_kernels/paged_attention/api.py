"""`paged_attention`: validates, regroups queries per KV head, and picks the lowering.

Shapes: q `[B, Hq, Dh]` (decode) or `[B, T, Hq, Dh]` (speculative verification, chunked prefill);
k/v pages `[N, P, K, Dh]` (a pool of N pages of P tokens); page_table `[B, max_pages]` int32
(slot i of sequence b lives in page page_table[b, i]); lengths `[B]` int32, tokens cached per
sequence, the T query tokens' own K/V included (they sit at positions lengths - T .. lengths - 1);
ALiBi slopes `[Hq]` float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import backends
from pallas_kernels.paged_attention import gpu, tpu
from pallas_kernels.paged_attention.common import Options


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, lengths: jax.Array,
                    page_table: jax.Array, *, k_scales: jax.Array | None = None,
                    v_scales: jax.Array | None = None, sm_scale: float | None = None,
                    sliding_window: int | None = None, alibi_slopes: jax.Array | None = None,
                    backend: str | None = None,
                    interpret: bool = False, num_warps: int | None = None) -> jax.Array:
  """Attention of each sequence's last T tokens against its paged K/V; returns q's shape/dtype.

  int8 pages need `k_scales`/`v_scales` `[N, P, K]` float32 (value = int8 * scale). The T
  queries attend causally among themselves; `sliding_window=W` limits each to its last W keys.
  `alibi_slopes` add -slope_h * (q_pos - k_pos) to head h's logits (ALiBi). Slots past
  `lengths[b]` may hold any page id within the pool; they are never read.
  """
  backend = backends.resolve(backend, interpret)
  squeeze = q.ndim == 3
  q4 = q[:, None] if squeeze else q
  if q4.ndim != 4:
    raise ValueError(f"q {q.shape} must be [B, H, Dh] or [B, T, H, Dh]")
  B, T, H, Dh = q4.shape
  if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[3] != Dh:
    raise ValueError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be "
                     f"[N, P, K, Dh={Dh}]")
  N, P, K, _ = k_pages.shape
  if H % K:
    raise ValueError(f"query heads {H} must be a multiple of kv heads {K}")
  if lengths.shape != (B,) or page_table.ndim != 2 or page_table.shape[0] != B:
    raise ValueError(f"lengths {lengths.shape} must be [B={B}] and page_table "
                     f"{page_table.shape} [B={B}, max_pages]")
  quantized = k_pages.dtype == jnp.int8
  if quantized != (k_scales is not None) or (k_scales is None) != (v_scales is None):
    raise ValueError("int8 pages need k_scales and v_scales (and float pages take none)")
  if quantized and (k_scales.shape != (N, P, K) or v_scales.shape != (N, P, K)):
    raise ValueError(f"k_scales {k_scales.shape} / v_scales {v_scales.shape} must be "
                     f"[N={N}, P={P}, K={K}]")
  if not quantized and k_pages.dtype != v_pages.dtype:
    raise ValueError(f"k/v pages dtypes differ: {k_pages.dtype} vs {v_pages.dtype}")
  if backend == "gpu" and (P < 16 or P & (P - 1)):
    raise ValueError(f"page_size {P}: the GPU lowering needs a power of two >= 16")
  if backend == "tpu" and P % 8:
    raise ValueError(f"page_size {P}: the TPU lowering needs a multiple of 8")
  if sliding_window is not None and sliding_window < 1:
    raise ValueError(f"sliding_window={sliding_window} must be >= 1")
  if alibi_slopes is not None and alibi_slopes.shape != (H,):
    raise ValueError(f"alibi_slopes {alibi_slopes.shape} must be [H={H}]")
  G = H // K
  opts = Options(T=T, groups=G, page_size=P,
                 sm_scale=float(Dh ** -0.5 if sm_scale is None else sm_scale),
                 sliding_window=sliding_window, quantized=quantized,
                 has_alibi=alibi_slopes is not None)
  # Rows r = t * G + g of one KV head; padded to a tile (Triton: power of two >= 16; TPU: 8).
  rows = T * G
  R = max(16, 1 << (rows - 1).bit_length()) if backend == "gpu" else -(-rows // 8) * 8
  q_rows = q4.reshape(B, T, K, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, K, rows, Dh)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, R - rows), (0, 0)))
  # Each row's slope, in the rows' order: `[K, R, 1]` (padding rows get 0).
  row_slopes = None
  if alibi_slopes is not None:
    per_head = jnp.asarray(alibi_slopes, jnp.float32).reshape(K, 1, G)
    row_slopes = jnp.broadcast_to(per_head, (K, T, G)).reshape(K, rows)
    row_slopes = jnp.pad(row_slopes, ((0, 0), (0, R - rows)))[..., None]
  # Out-of-range ids would read outside the pool; clipping keeps unused slots harmless.
  page_table = jnp.clip(page_table.astype(jnp.int32), 0, N - 1)
  lengths = lengths.astype(jnp.int32)
  if backend == "gpu":
    out = gpu.paged_attention(q_rows, lengths, page_table, k_pages, v_pages, k_scales, v_scales,
                              row_slopes, opts=opts, num_warps=num_warps, interpret=interpret)
  else:
    out = tpu.paged_attention(q_rows, lengths, page_table, k_pages, v_pages, k_scales, v_scales,
                              row_slopes, opts=opts, interpret=interpret)
  out = out[:, :, :rows].reshape(B, K, T, G, Dh).transpose(0, 2, 1, 3, 4).reshape(B, T, H, Dh)
  return out[:, 0] if squeeze else out
