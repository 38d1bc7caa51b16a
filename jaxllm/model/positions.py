"""Position encodings: rotary embeddings (RoPE, in the rotate-half layout Hugging Face Llama
uses) with the context-extension scalings of `ModelConfig.rope_scaling`, and ALiBi slopes.

Every scaling but "dynamic" is a fixed set of frequencies computed once on the host; "dynamic"
NTK recomputes them inside the program from each sequence's length, so one compiled step serves
every length.
"""

from __future__ import annotations

import dataclasses
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


def ntk_theta(theta: float, factor: float, head_dim: int) -> float:
  """NTK-aware base: theta * factor^(Dh / (Dh - 2)) stretches the lowest frequency by `factor`
  while the highest is nearly kept (bloc97's NTK-aware interpolation)."""
  return theta * factor ** (head_dim / (head_dim - 2))


def yarn_mscale(factor: float, m: float = 1.0) -> float:
  """YaRN's temperature for a context `factor`: 0.1 m ln(factor) + 1 (1 below 1x)."""
  return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def yarn_attention_factor(cfg: ModelConfig) -> float:
  """YaRN's temperature on q and k: the configured one, else `yarn_mscale(factor)`."""
  if cfg.rope_attention_factor:
    return float(cfg.rope_attention_factor)
  return yarn_mscale(cfg.rope_scaling_factor)


def _yarn_frequencies(cfg: ModelConfig) -> np.ndarray:
  """NTK-by-parts: dimensions turning fewer than beta_slow times over the original context are
  interpolated (divided by factor), those turning more than beta_fast times kept, a linear ramp
  between."""
  dim, theta, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor

  def band_edge(rotations):  # the dimension index that turns `rotations` times
    return dim * math.log(cfg.rope_original_max_len / (rotations * 2 * math.pi)) / (
        2 * math.log(theta))

  low, high = band_edge(cfg.rope_yarn_beta_fast), band_edge(cfg.rope_yarn_beta_slow)
  if cfg.rope_yarn_truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                 / np.float32(high - low), 0, 1).astype(np.float32)
  keep = np.float32(1) - ramp
  wavelength_scale = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32)
                                           / np.float32(dim))
  extrapolated = (np.float32(1) / wavelength_scale).astype(np.float32)
  interpolated = (np.float32(1) / (np.float32(factor) * wavelength_scale)).astype(np.float32)
  return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)


def scaled_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
  """The model's RoPE frequencies after `rope_scaling` (a host constant, float32); for "dynamic",
  the frequencies of sequences within the original context."""
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == "ntk":
    return rope_inverse_frequencies(cfg.head_dim, ntk_theta(cfg.rope_theta, factor,
                                                            cfg.head_dim))
  if cfg.rope_scaling == "yarn":
    return _yarn_frequencies(cfg)
  inv_freq = rope_inverse_frequencies(cfg.head_dim, cfg.rope_theta)
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


@dataclasses.dataclass(frozen=True)
class Rope:
  """A model's rotary embedding: hashable, so modules keep it as a static attribute.

  inv_freq `[Dh/2]` host frequencies; attention_factor scales rotated q and k (YaRN);
  dynamic_factor > 0 makes the frequencies grow with each sequence's length past
  original_max_len (dynamic NTK).
  """
  inv_freq: tuple[float, ...]
  attention_factor: float = 1.0
  theta: float = 10_000.0
  dynamic_factor: float = 0.0
  original_max_len: int = 0

  @classmethod
  def from_config(cls, cfg: ModelConfig) -> "Rope":
    inv_freq = tuple(float(f) for f in scaled_inverse_frequencies(cfg))
    if cfg.rope_scaling == "dynamic":
      return cls(inv_freq, theta=cfg.rope_theta, dynamic_factor=cfg.rope_scaling_factor,
                 original_max_len=cfg.rope_original_max_len)
    scale = yarn_attention_factor(cfg) if cfg.rope_scaling == "yarn" else 1.0
    return cls(inv_freq, attention_factor=scale)

  def frequencies(self, seq_len_B: jax.Array | None = None) -> jax.Array:
    """`[1, Dh/2]`, or `[B, Dh/2]` for dynamic NTK given each sequence's length `seq_len_B`."""
    static = jnp.asarray(np.asarray(self.inv_freq, np.float32))[None]
    if not self.dynamic_factor or seq_len_B is None:
      return static
    # Hugging Face's dynamic NTK: theta * (f * L / L0 - (f - 1))^(Dh / (Dh - 2)), L = max(L, L0).
    dim = 2 * len(self.inv_freq)
    f, L0 = self.dynamic_factor, self.original_max_len
    L = jnp.maximum(seq_len_B, L0).astype(jnp.float32)
    theta_B = self.theta * (f * L / L0 - (f - 1)) ** (dim / (dim - 2))
    exponents = jnp.arange(0, dim, 2, dtype=jnp.float32) / dim
    grown = 1.0 / theta_B[:, None] ** exponents[None]
    return jnp.where((seq_len_B > L0)[:, None], grown, static)

  def apply(self, x_BTNDh: jax.Array, positions_BT: jax.Array,
            seq_len_B: jax.Array | None = None) -> jax.Array:
    """Rotates q or k `[B, T, N, Dh]` at `positions_BT`; `seq_len_B` (dynamic NTK only): each
    sequence's length so far, its new tokens included."""
    return apply_rope(x_BTNDh, positions_BT, self.frequencies(seq_len_B),
                      scale=self.attention_factor)


def apply_rope(x_BTNDh: jax.Array, positions_BT: jax.Array,
               inv_freq: np.ndarray | jax.Array | float, scale: float = 1.0) -> jax.Array:
  """Rotates pairs (i, i + Dh/2) of each head by angle position * inv_freq[i]; float32 math.

  `inv_freq` is `[Dh/2]` frequencies, `[B, Dh/2]` per sequence, or a float theta for unscaled
  RoPE; `scale` multiplies the result (YaRN's attention factor).
  """
  head_dim = x_BTNDh.shape[-1]
  if isinstance(inv_freq, (int, float)):
    inv_freq = rope_inverse_frequencies(head_dim, float(inv_freq))
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  inv_freq_Bh = inv_freq if inv_freq.ndim == 2 else inv_freq[None]
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_Bh[:, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  if scale != 1.0:
    sin, cos = sin * scale, cos * scale
  x = x_BTNDh.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNDh.dtype)


def alibi_slopes(n_heads: int) -> np.ndarray:
  """`[n_heads]` float32 ALiBi slopes: the geometric sequence 2^(-8i/n), i = 1..n, for a power
  of two n; otherwise those of the nearest lower power of two p, then every other slope of 2p
  (the paper's rule, so a model's first p heads keep the slopes of a p-head model)."""
  def geometric(n):
    return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

  p = 1 << (n_heads.bit_length() - 1)
  slopes = geometric(p) + geometric(2 * p)[0::2][:n_heads - p]
  return np.asarray(slopes, np.float32)
