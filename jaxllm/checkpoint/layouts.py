"""Weight layouts: Hugging Face state dicts (Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2, Gemma
2, Gemma 3, Mixtral, Qwen2-MoE, Qwen3-MoE) <-> jaxllm params, one table for every family.

HF Linear weights are `[out, in]`; ours are einsum operands `[in, ...out]`:
  q_proj [H*Dh, D] -> attn.q [D, H, Dh]      o_proj [D, H*Dh] -> attn.o [H, Dh, D]
  k/v_proj [K*Dh, D] -> attn.k/v [D, K, Dh]  q/k/v_proj.bias -> attn.q/k/v_bias [H|K, Dh]
  q_norm/k_norm [Dh] -> attn.q_norm/k_norm   gate/up_proj [F, D] -> mlp.gate/up [D, F]
  down_proj [D, F] -> mlp.down [F, D]        lm_head [V, D] -> lm_head [D, V]
  OLMo 2's q_norm/k_norm [H*Dh], [K*Dh] (one norm over all heads) -> attn.q_norm/k_norm [H|K, Dh]
  Phi-3's qkv_proj [(H+2K)*Dh, D] (q, k, v rows in turn) and gate_up_proj [2F, D] (gate rows,
  then up) are split on reading and fused on writing (`hf_from_params(fused=True)`).
Block norms: pre-norm input_layernorm -> attn_norm, post_attention_layernorm -> mlp_norm;
OLMo 2's post-norm post_attention_layernorm -> attn_post_norm, post_feedforward_layernorm ->
mlp_post_norm; Gemma's sandwich input_layernorm -> attn_norm, post_attention_layernorm ->
attn_post_norm, pre_feedforward_layernorm -> mlp_norm, post_feedforward_layernorm ->
mlp_post_norm (`norm_names`). Gemma's norm weights are stored as w of (1 + w), as ours are
under `norm_offset=1`.
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

import collections.abc

import numpy as np

from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.config import ModelConfig
from jaxllm.model.transformer import layer_layout

_PRE_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_POST_NORMS = {"attn_post_norm": "post_attention_layernorm",
               "mlp_post_norm": "post_feedforward_layernorm"}
_SANDWICH_NORMS = {"attn_norm": "input_layernorm", "attn_post_norm": "post_attention_layernorm",
                   "mlp_norm": "pre_feedforward_layernorm",
                   "mlp_post_norm": "post_feedforward_layernorm"}


def norm_names(cfg: ModelConfig) -> dict[str, str]:
  """{our block norm: its Hugging Face module name} for the model's norm placement."""
  return {"pre": _PRE_NORMS, "post": _POST_NORMS,
          "sandwich": _SANDWICH_NORMS}[cfg.norm_placement]
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


class LazyState(collections.abc.Mapping):
  """A state dict whose tensors are built when read: `{name: () -> array}`."""

  def __init__(self, builders: dict):
    self._builders = builders

  def __getitem__(self, name: str) -> np.ndarray:
    return self._builders[name]()

  def __iter__(self):
    return iter(self._builders)

  def __len__(self) -> int:
    return len(self._builders)


def _take(state, name: str, shape: tuple[int, ...]) -> np.ndarray:
  if name not in state:
    raise UnsupportedCheckpoint(f"weight {name!r} is missing from the checkpoint")
  w = np.asarray(state[name], np.float32)
  if w.shape != shape:
    raise UnsupportedCheckpoint(f"weight {name!r} has shape {w.shape}, expected {shape}")
  return w


def expert_family(state_or_names) -> str:
  """"mixtral" when the expert weights carry Mixtral's names, else "qwen"."""
  return "mixtral" if any("block_sparse_moe" in k for k in state_or_names) else "qwen"


def _stacked(fn, depths):
  """A builder of `fn(i)` for every layer i in `depths`, stacked on a leading axis."""
  return lambda: np.stack([fn(i) for i in depths])


def _attention_leaves(state, cfg: ModelConfig, depths, stack: str) -> dict:
  """`{path: build}` for the attention and norm params of the layers at `depths`, each
  `build()` returning one stacked `[L, ...]` array."""
  D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  get = lambda i, name, shape: _take(state, f"model.layers.{i}.{name}", shape)
  if f"model.layers.{depths[0]}.self_attn.qkv_proj.weight" in state:  # Phi-3
    rows = {"q": (0, H), "k": (H, H + K), "v": (H + K, H + 2 * K)}

    def qkv(i, name):
      lo, hi = rows[name]
      return get(i, "self_attn.qkv_proj.weight", ((H + 2 * K) * Dh, D))[lo * Dh:hi * Dh]
  else:
    qkv = lambda i, name: get(i, f"self_attn.{name}_proj.weight", (
        (H if name == "q" else K) * Dh, D))
  per_layer = {
      "attn/q": lambda i: qkv(i, "q").T.reshape(D, H, Dh),
      "attn/k": lambda i: qkv(i, "k").T.reshape(D, K, Dh),
      "attn/v": lambda i: qkv(i, "v").T.reshape(D, K, Dh),
      "attn/o": lambda i: get(i, "self_attn.o_proj.weight", (D, H * Dh)).T.reshape(H, Dh, D),
  }
  for ours, theirs in norm_names(cfg).items():
    per_layer[f"{ours}/scale"] = lambda i, t=theirs: get(i, t + ".weight", (D,))
  if cfg.qkv_bias:
    for name, heads in (("q", H), ("k", K), ("v", K)):
      per_layer[f"attn/{name}_bias"] = (
          lambda i, n=name, h=heads: get(i, f"self_attn.{n}_proj.bias", (h * Dh,)).reshape(h, Dh))
  if cfg.qk_norm and cfg.qk_norm_over_heads:
    for name, heads in (("q", H), ("k", K)):
      per_layer[f"attn/{name}_norm/scale"] = (
          lambda i, n=name, h=heads: get(i, f"self_attn.{n}_norm.weight", (h * Dh,)).reshape(
              h, Dh))
  elif cfg.qk_norm:
    for name in ("q", "k"):
      per_layer[f"attn/{name}_norm/scale"] = (
          lambda i, n=name: get(i, f"self_attn.{n}_norm.weight", (Dh,)))
  return {f"{stack}/{path}": _stacked(fn, depths) for path, fn in per_layer.items()}


def _mlp_leaves(state, prefix_of, d_model: int, d_ff: int, path: str, depths,
                names=("gate_proj", "up_proj", "down_proj")) -> dict:
  """`{path/gate|up|down: build}`: SwiGLU weights of the modules `prefix_of(i)`, stacked over
  the layers at `depths`."""
  g, u, d = names
  if depths.size and f"{prefix_of(depths[0])}.gate_up_proj.weight" in state:  # Phi-3
    fused = lambda i: _take(state, f"{prefix_of(i)}.gate_up_proj.weight", (2 * d_ff, d_model))
    gate, up = lambda i: fused(i)[:d_ff].T, lambda i: fused(i)[d_ff:].T
  else:
    gate = lambda i: _take(state, f"{prefix_of(i)}.{g}.weight", (d_ff, d_model)).T
    up = lambda i: _take(state, f"{prefix_of(i)}.{u}.weight", (d_ff, d_model)).T
  one = {"gate": gate, "up": up,
         "down": lambda i: _take(state, f"{prefix_of(i)}.{d}.weight", (d_model, d_ff)).T}
  return {f"{path}/{k}": _stacked(fn, depths) for k, fn in one.items()}


def _moe_leaves(state, cfg: ModelConfig, depths, family: str) -> dict:
  """`{moe_blocks/moe/...: build}` for the MoE layers at `depths`."""
  E, D, F = cfg.n_experts, cfg.d_model, cfg.moe_d_ff or cfg.d_ff
  module, g, u, d = EXPERT_NAMES[family]
  pre = lambda i: f"model.layers.{i}.{module}"

  def experts(i, which):  # [E, D, F] (gate, up) or [E, F, D] (down)
    if f"{pre(i)}.experts.gate_up_proj" in state:  # transformers 5's fused in-memory layout
      if which == "down":
        return _take(state, f"{pre(i)}.experts.down_proj", (E, D, F)).transpose(0, 2, 1)
      gate_up = _take(state, f"{pre(i)}.experts.gate_up_proj", (E, 2 * F, D))
      return (gate_up[:, :F] if which == "gate" else gate_up[:, F:]).transpose(0, 2, 1)
    name = {"gate": g, "up": u, "down": d}[which]
    shape = (D, F) if which == "down" else (F, D)
    return np.stack([_take(state, f"{pre(i)}.experts.{e}.{name}.weight", shape).T
                     for e in range(E)])

  out = {"moe_blocks/moe/router": _stacked(
      lambda i: _take(state, f"{pre(i)}.gate.weight", (E, D)).T, depths)}
  for which in ("gate", "up", "down"):
    out[f"moe_blocks/moe/{which}"] = _stacked(lambda i, w=which: experts(i, w), depths)
  if cfg.n_shared_experts:
    out.update(_mlp_leaves(state, lambda i: f"{pre(i)}.shared_expert", D,
                           cfg.n_shared_experts * F, "moe_blocks/moe/shared", depths))
    if cfg.shared_expert_gate:
      out["moe_blocks/moe/shared_gate"] = _stacked(
          lambda i: _take(state, f"{pre(i)}.shared_expert_gate.weight", (1, D)).T, depths)
  if cfg.router_bias_update_rate > 0:
    out["moe_blocks/moe/router_bias"] = lambda: np.zeros((len(depths), E), np.float32)
  return out


def param_leaves(state, cfg: ModelConfig) -> dict:
  """`{params path: build}` for a HF Llama/Mistral/Mixtral/Qwen-MoE state dict: each `build()`
  reads the tensors of one (stacked) jaxllm param and returns it as float32 numpy."""
  D, V = cfg.d_model, cfg.vocab_size
  layout = layer_layout(cfg)
  leaves = {"embed": lambda: _take(state, "model.embed_tokens.weight", (V, D)),
            "final_norm/scale": lambda: _take(state, "model.norm.weight", (D,))}
  if layout.n_dense:
    depths = layout.dense_depths()
    leaves.update(_attention_leaves(state, cfg, depths, "blocks"))
    leaves.update(_mlp_leaves(state, lambda i: f"model.layers.{i}.mlp", D, cfg.d_ff,
                              "blocks/mlp", depths))
  if layout.groups:
    depths = layout.moe_depths()
    leaves.update(_attention_leaves(state, cfg, depths, "moe_blocks"))
    leaves.update(_moe_leaves(state, cfg, depths, expert_family(state)))
  if not cfg.tie_embeddings:
    leaves["lm_head"] = lambda: _take(state, "lm_head.weight", (V, D)).T
  return leaves


def params_from_hf(state, cfg: ModelConfig, place=None) -> dict:
  """jaxllm params from a HF Llama/Mistral/Mixtral/Qwen-MoE state dict (a mapping, which may
  read lazily). `place(path, array)` (a `device_put` into the param's shards, say) takes each
  stacked param as soon as it is built, so the host holds one at a time; without it the params
  stay float32 numpy."""
  out: dict = {}
  for path, build in param_leaves(state, cfg).items():
    value = build() if place is None else place(path, build())
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _hf_attention(out: dict, blocks: dict, cfg: ModelConfig, depths, fused: bool) -> None:
  D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  a = blocks["attn"]
  for j, i in enumerate(depths):
    pre = f"model.layers.{i}."
    q = np.asarray(a["q"][j]).reshape(D, H * Dh).T
    k = np.asarray(a["k"][j]).reshape(D, K * Dh).T
    v = np.asarray(a["v"][j]).reshape(D, K * Dh).T
    if fused:
      out[pre + "self_attn.qkv_proj.weight"] = np.concatenate([q, k, v])
    else:
      out[pre + "self_attn.q_proj.weight"] = q
      out[pre + "self_attn.k_proj.weight"] = k
      out[pre + "self_attn.v_proj.weight"] = v
    out[pre + "self_attn.o_proj.weight"] = np.asarray(a["o"][j]).reshape(H * Dh, D).T
    if cfg.qkv_bias:
      for name in ("q", "k", "v"):
        out[pre + f"self_attn.{name}_proj.bias"] = np.asarray(a[f"{name}_bias"][j]).reshape(-1)
    if cfg.qk_norm:
      for name in ("q", "k"):
        out[pre + f"self_attn.{name}_norm.weight"] = np.asarray(
            a[f"{name}_norm"]["scale"][j]).reshape(-1)
    for ours, theirs in norm_names(cfg).items():
      out[pre + theirs + ".weight"] = np.asarray(blocks[ours]["scale"][j])


def _hf_mlp(out: dict, prefix: str, mlp: dict, names=("gate_proj", "up_proj", "down_proj"),
            fused: bool = False):
  g, u, d = names
  if fused:
    out[f"{prefix}.gate_up_proj.weight"] = np.concatenate([np.asarray(mlp["gate"]).T,
                                                           np.asarray(mlp["up"]).T])
  else:
    out[f"{prefix}.{g}.weight"] = np.asarray(mlp["gate"]).T
    out[f"{prefix}.{u}.weight"] = np.asarray(mlp["up"]).T
  out[f"{prefix}.{d}.weight"] = np.asarray(mlp["down"]).T


def hf_from_params(params: dict, cfg: ModelConfig, family: str = "qwen", *,
                   fused: bool = False) -> dict[str, np.ndarray]:
  """A HF state dict (float32 numpy, contiguous) from jaxllm params; `family` names the experts
  of an MoE model ("mixtral" or "qwen"); `fused` writes Phi-3's qkv_proj and gate_up_proj."""
  layout = layer_layout(cfg)
  out = {"model.embed_tokens.weight": np.asarray(params["embed"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]).T
  if layout.n_dense:
    b = params["blocks"]
    depths = layout.dense_depths()
    _hf_attention(out, b, cfg, depths, fused)
    for j, i in enumerate(depths):
      _hf_mlp(out, f"model.layers.{i}.mlp", {k: v[j] for k, v in b["mlp"].items()},
              fused=fused)
  if layout.groups:
    b = params["moe_blocks"]
    depths = layout.moe_depths()
    _hf_attention(out, b, cfg, depths, fused=False)
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
