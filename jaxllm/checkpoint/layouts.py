"""Weight layouts: Hugging Face Llama state dicts <-> jaxllm params.

HF Linear weights are `[out, in]`; ours are einsum operands `[in, ...out]`:
  q_proj [H*Dh, D] -> attn.q [D, H, Dh]      o_proj [D, H*Dh] -> attn.o [H, Dh, D]
  k/v_proj [K*Dh, D] -> attn.k/v [D, K, Dh]  gate/up_proj [F, D] -> mlp.gate/up [D, F]
  down_proj [D, F] -> mlp.down [F, D]        lm_head [V, D] -> lm_head [D, V]
Per-layer tensors are stacked on a leading `[L]` axis.
"""

from __future__ import annotations

import numpy as np

from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.config import ModelConfig

_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


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


def params_from_hf(state: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
  """jaxllm params (float32 numpy) from a HF Llama/Mistral state dict."""
  D, H, K, Dh, F, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                       cfg.vocab_size)

  def layer(i, name, shape):
    return _take(state, f"model.layers.{i}.{name}.weight", shape)

  blocks = {"attn": {}, "mlp": {}, "attn_norm": {}, "mlp_norm": {}}
  per_layer = {
      ("attn", "q"): lambda i: layer(i, "self_attn.q_proj", (H * Dh, D)).T.reshape(D, H, Dh),
      ("attn", "k"): lambda i: layer(i, "self_attn.k_proj", (K * Dh, D)).T.reshape(D, K, Dh),
      ("attn", "v"): lambda i: layer(i, "self_attn.v_proj", (K * Dh, D)).T.reshape(D, K, Dh),
      ("attn", "o"): lambda i: layer(i, "self_attn.o_proj", (D, H * Dh)).T.reshape(H, Dh, D),
      ("mlp", "gate"): lambda i: layer(i, "mlp.gate_proj", (F, D)).T,
      ("mlp", "up"): lambda i: layer(i, "mlp.up_proj", (F, D)).T,
      ("mlp", "down"): lambda i: layer(i, "mlp.down_proj", (D, F)).T,
      ("attn_norm", "scale"): lambda i: layer(i, _NORMS["attn_norm"], (D,)),
      ("mlp_norm", "scale"): lambda i: layer(i, _NORMS["mlp_norm"], (D,)),
  }
  for (group, name), get in per_layer.items():
    blocks[group][name] = np.stack([get(i) for i in range(cfg.n_layers)])
  params = {"embed": _take(state, "model.embed_tokens.weight", (V, D)), "blocks": blocks,
            "final_norm": {"scale": _take(state, "model.norm.weight", (D,))}}
  if not cfg.tie_embeddings:
    params["lm_head"] = _take(state, "lm_head.weight", (V, D)).T
  return params


def hf_from_params(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """A HF Llama state dict (float32 numpy, contiguous) from jaxllm params."""
  D, H, K, Dh = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  p = {k: v for k, v in params.items()}
  b = params["blocks"]
  out = {"model.embed_tokens.weight": np.asarray(p["embed"]),
         "model.norm.weight": np.asarray(p["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.asarray(p["lm_head"]).T
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    out[pre + "self_attn.q_proj.weight"] = np.asarray(b["attn"]["q"][i]).reshape(D, H * Dh).T
    out[pre + "self_attn.k_proj.weight"] = np.asarray(b["attn"]["k"][i]).reshape(D, K * Dh).T
    out[pre + "self_attn.v_proj.weight"] = np.asarray(b["attn"]["v"][i]).reshape(D, K * Dh).T
    out[pre + "self_attn.o_proj.weight"] = np.asarray(b["attn"]["o"][i]).reshape(H * Dh, D).T
    out[pre + "mlp.gate_proj.weight"] = np.asarray(b["mlp"]["gate"][i]).T
    out[pre + "mlp.up_proj.weight"] = np.asarray(b["mlp"]["up"][i]).T
    out[pre + "mlp.down_proj.weight"] = np.asarray(b["mlp"]["down"][i]).T
    out[pre + "input_layernorm.weight"] = np.asarray(b["attn_norm"]["scale"][i])
    out[pre + "post_attention_layernorm.weight"] = np.asarray(b["mlp_norm"]["scale"][i])
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}
