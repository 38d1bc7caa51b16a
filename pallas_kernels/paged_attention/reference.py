"""Plain-jnp paged attention: gather each sequence's pages into a contiguous cache, then attend.

The oracle for the kernels (and an XLA fallback): memory `[B, max_pages * page_size, K, Dh]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.common import MASK_VALUE


def gather_pages(pages, page_table, scales=None):
  """pages `[N, P, K, Dh]` (int8 with `scales [N, P, K]`) -> `[B, max_pages * P, K, Dh]` float32."""
  x = pages[page_table].astype(jnp.float32)  # [B, max_pages, P, K, Dh]
  if scales is not None:
    x = x * scales[page_table][..., None]
  B, M, P, K, Dh = x.shape
  return x.reshape(B, M * P, K, Dh)


def paged_attention_reference(q, k_pages, v_pages, lengths, page_table, *, k_scales=None,
                              v_scales=None, sm_scale=None, sliding_window=None,
                              alibi_slopes=None):
  """q `[B, Hq, Dh]` or `[B, T, Hq, Dh]`; the T queries are the last T of each sequence's
  `lengths[b]` cached tokens (already written) and attend causally (ALiBi with `[Hq]` slopes).
  Returns q's shape and dtype."""
  squeeze = q.ndim == 3
  q4 = q[:, None] if squeeze else q
  B, T, H, Dh = q4.shape
  k = gather_pages(k_pages, page_table, k_scales)
  v = gather_pages(v_pages, page_table, v_scales)
  S, K = k.shape[1], k.shape[2]
  scale = Dh ** -0.5 if sm_scale is None else sm_scale
  s = jnp.einsum("btkgd,bskd->bkgts", q4.reshape(B, T, K, H // K, Dh).astype(jnp.float32), k,
                 precision=jax.lax.Precision.HIGHEST) * scale
  q_pos = lengths[:, None] - T + jnp.arange(T)[None, :]  # [B, T]
  k_pos = jnp.arange(S)
  if alibi_slopes is not None:
    distance = jnp.abs(q_pos[:, :, None] - k_pos[None, None, :]).astype(jnp.float32)  # [B, T, S]
    slopes = jnp.asarray(alibi_slopes, jnp.float32).reshape(1, K, H // K, 1, 1)
    s = s - slopes * distance[:, None, None]
  visible = k_pos[None, None, :] <= q_pos[:, :, None]
  if sliding_window is not None:
    visible &= k_pos[None, None, :] > q_pos[:, :, None] - sliding_window
  s = jnp.where(visible[:, None, None], s, MASK_VALUE)
  out = jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v,
                   precision=jax.lax.Precision.HIGHEST).reshape(B, T, H, Dh).astype(q.dtype)
  return out[:, 0] if squeeze else out
