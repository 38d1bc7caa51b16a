"""Rotary position embeddings (RoPE), in the rotate-half layout Hugging Face Llama uses,
with the context-extension scalings of `ModelConfig.rope_scaling`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig


def rope_inverse_frequencies(head_dim: int, theta: float) -> np.ndarray:
  """`[head_dim // 2]` float32 angular frequencies theta^(-2i/Dh).

  Computed in float32 step by step, as Hugging Face does, so imported models match it bit for bit
  here rather than differing in the last place of every frequency.
  """
  exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)


def scaled_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """The model's RoPE frequencies after `rope_scaling` (a host constant, float32)."""
  inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta)
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "linear":
    inv_freq = inv_freq / factor
  elif cfg.rope_scaling == "llama3":
    # Long wavelengths (beyond the original context / low_freq_factor) are slowed by `factor`,
    # short ones (below original / high_freq_factor) kept, and the band between interpolated.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = cfg.rope_original_max_len / cfg.rope_low_freq_factor
    high_wavelen = cfg.rope_original_max_len / cfg.rope_high_freq_factor
    smooth = (cfg.rope_original_max_len / wavelen - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / factor,
                        np.where(wavelen < high_wavelen, inv_freq, blended))
  return inv_freq.astype(np.float32)


def apply_rope(x_BTNDh: jax.Array, positions_BT: jax.Array,
               inv_freq: np.ndarray | float) -> jax.Array:
  """Rotates pairs (i, i + Dh/2) of each head by angle position * inv_freq[i]; float32 math.

  `inv_freq` is `[Dh/2]` frequencies, or a float theta for unscaled RoPE.
  """
  head_dim = x_BTNDh.shape[-1]
  if isinstance(inv_freq, (int, float)):
    inv_freq = rope_inverse_frequencies(head_dim, float(inv_freq))
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  x = x_BTNDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNDh.dtype)
