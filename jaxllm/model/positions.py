"""Rotary position embeddings (RoPE), in the rotate-half layout Hugging Face Llama uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
  """`[head_dim // 2]` float32 angular frequencies theta^(-2i/Dh)."""
  return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def apply_rope(x_BTNDh: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotates pairs (i, i + Dh/2) of each head by angle position * freq_i; math in float32."""
  head_dim = x_BTNDh.shape[-1]
  inv_freq = rope_inverse_frequencies(head_dim, theta)
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  x = x_BTNDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNDh.dtype)
