"""Weight layouts: Hugging Face state dicts (Llama, Mistral, Mixtral, Qwen2-MoE, Qwen3-MoE) <->
jaxllm params, one table for every family.

HF Linear weights are `[out, in]`; ours are einsum operands `[in, ...out]`:
  q_proj [H*Dh, D] -> attn.q [D, H, Dh]      o_proj [D, H*Dh] -> attn.o [H, Dh, D]
  k/v_proj [K*Dh, D] -> attn.k/v [D, K, Dh]  q/k/v_proj.bias -> attn.q/k/v_bias [H|K, Dh]
  q_norm/k_norm [Dh] -> attn.q_norm/k_norm   gate/up_proj [F, D] -> mlp.gate/up [D, F]
  down_proj [D, F] -> mlp.down [F, D]        lm_head [V, D] -> lm_head [D, V]
MoE layers (`moe_blocks`): the router [E, D] -> moe.router [D, E]; expert e's gate/up/down as
above, stacked on an expert axis -> moe.gate/up [E, D, F], moe.down [E, F, D]; shared experts
-> moe.shared.gate/up/down; Qwen2-MoE's shared_expert_gate [1, D] -> moe.shared_gate [D, 1].
Expert names differ by family:
  Mixtral      block_sparse_moe.gate, block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down)
  Qwen2/3-MoE  mlp.gate, mlp.experts.{e}.gate_proj / up_proj / down_proj, mlp.shared_expert.*
(reading also accepts transformers 5's fused `experts.gate_up_proj` [E, 2F, D] and
`experts.down_proj` [E, D, F]). Per-layer tensors are stacked on a leading layer axis: the dense
layers in `blocks`, the MoE layers in `moe_blocks` (`transformer.LayerLayout`).
"""

from __future__ import annotations

import numpy as np

from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.config import ModelConfig
from jaxllm.model.transformer import layer_layout

_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
# family -> (MoE module name, expert gate, up, down names)
EXPERT_NAMES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
                "qwen": ("mlp", "gate_proj", "up_proj", "down_proj")}


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Rows of each head from GGML's pair-interleaved RoPE order to rotate-half order.

  GGML row 2j + h of a head holds rotate-half row h * Dh/2 + j.
  """
  rows = w.shape[0]
  head_dim = rows // n_heads
  return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def half_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of `interleaved_to_half`."""
  head_dim = w.shape[0] // n_heads
  return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _take(state: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
  if name not in state:
    raise UnsupportedCheckpoint(f"weight {name!r} is missing from the checkpoint")
  w = np.asarray(state[name], np.float32)
  if w.shape != shape:
    raise UnsupportedCheckpoint(f"weight {name!r} has shape {w.shape}, expected {shape}")
  return w


def expert_family(state_or_names) -> str:
  """"mixtral" when the expert weights carry Mixtral's names, else "qwen"."""
  return "mixtral" if any("block_sparse_moe" in k for k in state_or_names) else "qwen"


def _attention(state, cfg: ModelConfig, depths) -> dict:
  """Attention and norm params of the layers at `depths`, stacked."""
  D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  get = lambda i, name, shape: _take(state, f"model.layers.{i}.{name}", shape)
  per_layer = {
      ("attn", "q"): lambda i: get(i, "self_attn.q_proj.weight", (H * Dh, D)).T.reshape(D, H, Dh),
      ("attn", "k"): lambda i: get(i, "self_attn.k_proj.weight", (K * Dh, D)).T.reshape(D, K, Dh),
      ("attn", "v"): lambda i: get(i, "self_attn.v_proj.weight", (K * Dh, D)).T.reshape(D, K, Dh),
      ("attn", "o"): lambda i: get(i, "self_attn.o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D),
      ("attn_norm", "scale"): lambda i: get(i, _NORMS["attn_norm"] + ".weight", (D,)),
      ("mlp_norm", "scale"): lambda i: get(i, _NORMS["mlp_norm"] + ".weight", (D,)),
  }
  if cfg.qkv_bias:
    for name, heads in (("q", H), ("k", K), ("v", K)):
      per_layer[("attn", f"{name}_bias")] = (
          lambda i, n=name, h=heads: get(i, f"self_attn.{n}_proj.bias", (h * Dh,)).reshape(h, Dh))
  if cfg.qk_norm:
    for name in ("q", "k"):
      per_layer[("attn", f"{name}_norm")] = lambda i, n=name: {
          "scale": get(i, f"self_attn.{n}_norm.weight", (Dh,))}
  out: dict = {}
  for (group, name), fn in per_layer.items():
    out.setdefault(group, {})[name] = _stack([fn(i) for i in depths])
  return out


def _stack(items):
  if isinstance(items[0], dict):
    return {k: _stack([it[k] for it in items]) for k in items[0]}
  return np.stack(items)


def _mlp(state, prefix: str, d_model: int, d_ff: int, names=("gate_proj", "up_proj",
                                                             "down_proj")) -> dict:
  g, u, d = names
  return {"gate": _take(state, f"{prefix}.{g}.weight", (d_ff, d_model)).T,
          "up": _take(state, f"{prefix}.{u}.weight", (d_ff, d_model)).T,
          "down": _take(state, f"{prefix}.{d}.weight", (d_model, d_ff)).T}


def _moe(state, cfg: ModelConfig, i: int, family: str) -> dict:
  E, D, F = cfg.n_experts, cfg.d_model, cfg.moe_d_ff or cfg.d_ff
  module, g, u, d = EXPERT_NAMES[family]
  pre = f"model.layers.{i}.{module}"
  out = {"router": _take(state, f"{pre}.gate.weight", (E, D)).T}
  if f"{pre}.experts.gate_up_proj" in state:  # transformers 5's fused in-memory layout
    gate_up = _take(state, f"{pre}.experts.gate_up_proj", (E, 2 * F, D))
    out["gate"] = gate_up[:, :F].transpose(0, 2, 1)
    out["up"] = gate_up[:, F:].transpose(0, 2, 1)
    out["down"] = _take(state, f"{pre}.experts.down_proj", (E, D, F)).transpose(0, 2, 1)
  else:
    experts = [_mlp(state, f"{pre}.experts.{e}", D, F, (g, u, d)) for e in range(E)]
    out.update(_stack(experts))
  if cfg.n_shared_experts:
    out["shared"] = _mlp(state, f"{pre}.shared_expert", D, cfg.n_shared_experts * F)
    if cfg.shared_expert_gate:
      out["shared_gate"] = _take(state, f"{pre}.shared_expert_gate.weight", (1, D)).T
  if cfg.router_bias_update_rate > 0:
    out["router_bias"] = np.zeros((E,), np.float32)
  return out


def params_from_hf(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """jaxllm params (float32 numpy) from a HF Llama/Mistral/Mixtral/Qwen-MoE state dict."""
  D, V = cfg.d_model, cfg.vocab_size
  layout = layer_layout(cfg)
  params = {"embed": _take(state, "model.embed_tokens.weight", (V, D)),
            "final_norm": {"scale": _take(state, "model.norm.weight", (D,))}}
  if layout.n_dense:
    depths = layout.dense_depths()
    params["blocks"] = _attention(state, cfg, depths)
    params["blocks"]["mlp"] = _stack([_mlp(state, f"model.layers.{i}.mlp", D, cfg.d_ff)
                                      for i in depths])
  if layout.groups:
    depths = layout.moe_depths()
    family = expert_family(state)
    params["moe_blocks"] = _attention(state, cfg, depths)
    params["moe_blocks"]["moe"] = _stack([_moe(state, cfg, i, family) for i in depths])
  if not cfg.tie_embeddings:
    params["lm_head"] = _take(state, "lm_head.weight", (V, D)).T
  return params


def _hf_attention(out: dict, blocks: dict, cfg: ModelConfig, depths) -> None:
  D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  a = blocks["attn"]
  for j, i in enumerate(depths):
    pre = f"model.layers.{i}."
    out[pre + "self_attn.q_proj.weight"] = np.asarray(a["q"][j]).reshape(D, H * Dh).T
    out[pre + "self_attn.k_proj.weight"] = np.asarray(a["k"][j]).reshape(D, K * Dh).T
    out[pre + "self_attn.v_proj.weight"] = np.asarray(a["v"][j]).reshape(D, K * Dh).T
    out[pre + "self_attn.o_proj.weight"] = np.asarray(a["o"][j]).reshape(H * Dh, D).T
    if cfg.qkv_bias:
      for name in ("q", "k", "v"):
        out[pre + f"self_attn.{name}_proj.bias"] = np.asarray(a[f"{name}_bias"][j]).reshape(-1)
    if cfg.qk_norm:
      for name in ("q", "k"):
        out[pre + f"self_attn.{name}_norm.weight"] = np.asarray(a[f"{name}_norm"]["scale"][j])
    for ours, theirs in _NORMS.items():
      out[pre + theirs + ".weight"] = np.asarray(blocks[ours]["scale"][j])


def _hf_mlp(out: dict, prefix: str, mlp: dict, names=("gate_proj", "up_proj", "down_proj")):
  g, u, d = names
  out[f"{prefix}.{g}.weight"] = np.asarray(mlp["gate"]).T
  out[f"{prefix}.{u}.weight"] = np.asarray(mlp["up"]).T
  out[f"{prefix}.{d}.weight"] = np.asarray(mlp["down"]).T


def hf_from_params(params: dict, cfg: ModelConfig, family: str = "qwen") -> dict[str, np.ndarray]:
  """A HF state dict (float32 numpy, contiguous) from jaxllm params; `family` names the experts
  of an MoE model ("mixtral" or "qwen")."""
  layout = layer_layout(cfg)
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]).T
  if layout.n_dense:
    b = params["blocks"]
    depths = layout.dense_depths()
    _hf_attention(out, b, cfg, depths)
    for j, i in enumerate(depths):
      _hf_mlp(out, f"model.layers.{i}.mlp", {k: v[j] for k, v in b["mlp"].items()})
  if layout.groups:
    b = params["moe_blocks"]
    depths = layout.moe_depths()
    _hf_attention(out, b, cfg, depths)
    module, g, u, d = EXPERT_NAMES[family]
    for j, i in enumerate(depths):
      m = {k: v[j] for k, v in b["moe"].items() if k != "shared"}
      pre = f"model.layers.{i}.{module}"
      out[f"{pre}.gate.weight"] = np.asarray(m["router"]).T
      for e in range(cfg.n_experts):
        _hf_mlp(out, f"{pre}.experts.{e}", {k: m[k][e] for k in ("gate", "up", "down")},
                (g, u, d))
      if cfg.n_shared_experts:
        _hf_mlp(out, f"{pre}.shared_expert", {k: v[j] for k, v in b["moe"]["shared"].items()})
        if cfg.shared_expert_gate:
          out[f"{pre}.shared_expert_gate.weight"] = np.asarray(m["shared_gate"]).T
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
