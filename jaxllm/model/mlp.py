"""SwiGLU feed-forward block: down(silu(x @ gate) * (x @ up))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.layers import param


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.gate = param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std, pd)
    self.up = param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std, pd)
    self.down = param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), out_std, pd)

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dt = x_BTD.dtype
    gate_BTF = jnp.einsum("btd,df->btf", x_BTD, self.gate[...].astype(dt))
    up_BTF = jnp.einsum("btd,df->btf", x_BTD, self.up[...].astype(dt))
    return jnp.einsum("btf,fd->btd", jax.nn.silu(gate_BTF) * up_BTF, self.down[...].astype(dt))
