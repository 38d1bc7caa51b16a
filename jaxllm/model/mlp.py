"""Gated feed-forward block: down(act(x @ gate) * (x @ up)), act SiLU (SwiGLU) or tanh-approximated
GELU (GeGLU, Gemma); weights float or QTensor."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.model.layers import param
from jaxllm.ops.quant_matmul import project


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, d_ff: int | None = None, rngs: nnx.Rngs):
    """`d_ff` overrides `cfg.d_ff` (the shared experts of an MoE layer)."""
    pd = jnp.dtype(cfg.param_dtype)
    F = d_ff or cfg.d_ff
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    self.gate = param(rngs, (cfg.d_model, F), ("embed", "mlp"), cfg.init_std, pd)
    self.up = param(rngs, (cfg.d_model, F), ("embed", "mlp"), cfg.init_std, pd)
    self.down = param(rngs, (F, cfg.d_model), ("mlp", "embed"), out_std, pd)
    self.activation = cfg.mlp_activation

  def hidden(self, x_BTD: jax.Array) -> jax.Array:
    """act(x @ gate) * (x @ up) `[B, T, F]`: the down projection's input."""
    gate_BTF = project(x_BTD, self.gate[...])
    up_BTF = project(x_BTD, self.up[...])
    if self.activation == "gelu_tanh":
      return jax.nn.gelu(gate_BTF, approximate=True) * up_BTF
    return jax.nn.silu(gate_BTF) * up_BTF

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    hidden_BTF = self.hidden(x_BTD)
    return project(hidden_BTF, self.down[...])
