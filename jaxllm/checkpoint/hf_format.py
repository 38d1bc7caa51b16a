"""Hugging Face model directories: config.json + *.safetensors (+ tokenizer files).

Reads Llama and Mistral configs (GQA, RoPE theta and scaling, sliding window, tied embeddings),
single-file or sharded safetensors (any float dtype, converted to float32), and writes
directories that `transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.config import ModelConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def is_hf_dir(path: str) -> bool:
  config = os.path.join(path, "config.json")
  if not os.path.isfile(config):
    return False
  try:
    with open(config) as f:
      return "model_type" in json.load(f)
  except (OSError, ValueError):
    return False


def _rope_params(hf: dict[str, Any]) -> dict[str, Any]:
  """RoPE settings from either transformers 4 (`rope_scaling`) or 5 (`rope_parameters`)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = hf.get("rope_scaling") or {}
  merged = {**scaling, **params}
  if "rope_theta" not in merged and "rope_theta" in hf:
    merged["rope_theta"] = hf["rope_theta"]
  return merged


def model_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
  model_type = hf.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise UnsupportedCheckpoint(f"{where}: model_type {model_type!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise UnsupportedCheckpoint(f"{where}: attention/MLP biases are not supported")
  rope = _rope_params(hf)
  kind = rope.get("rope_type", rope.get("type", "default")) or "default"
  scaling: dict[str, Any] = {}
  if kind == "linear":
    scaling = dict(rope_scaling="linear", rope_scaling_factor=float(rope["factor"]))
  elif kind == "llama3":
    scaling = dict(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_len=int(rope["original_max_position_embeddings"]))
  elif kind != "default":
    raise UnsupportedCheckpoint(f"{where}: rope scaling {kind!r} is not supported "
                                "(supported: linear, llama3)")
  n_heads = int(hf["num_attention_heads"])
  d_model = int(hf["hidden_size"])
  return ModelConfig(
      vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or d_model // n_heads),
      d_ff=int(hf["intermediate_size"]),
      max_seq_len=int(hf.get("max_position_embeddings", 2048)),
      rope_theta=float(rope.get("rope_theta", 10_000.0)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
      sliding_window=int(hf.get("sliding_window") or 0) if model_type == "mistral" else 0,
      dtype="float32", **scaling)


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
  """A transformers config.json dict for `cfg` (Llama, or Mistral when it has a window)."""
  mistral = cfg.sliding_window > 0
  out: dict[str, Any] = {
      "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
      "model_type": "mistral" if mistral else "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "torch_dtype": "float32", "bos_token_id": bos_id, "eos_token_id": eos_id,
  }
  if not mistral:
    out.update(attention_bias=False, mlp_bias=False)
  if cfg.rope_scaling == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_len}
  if mistral:
    out["sliding_window"] = cfg.sliding_window
  return out


def read_config(path: str) -> dict[str, Any]:
  try:
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UnsupportedCheckpoint(f"{path}/config.json is unreadable: {e}") from None


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """All tensors of the directory's safetensors files (sharded or not) as float32 numpy."""
  from safetensors import SafetensorError, safe_open
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise UnsupportedCheckpoint(f"{path} has no .safetensors files")
  state: dict[str, np.ndarray] = {}
  for name in files:
    file = os.path.join(path, name)
    try:
      # "flax" reads bfloat16 too (numpy has no bfloat16).
      with safe_open(file, framework="flax") as f:
        for key in f.keys():
          state[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
    except (SafetensorError, OSError, ValueError) as e:
      raise UnsupportedCheckpoint(f"{file} is corrupt or truncated: {e}") from None
  return state


def write(path: str, cfg: ModelConfig, state: dict[str, np.ndarray], *,
          bos_id: int | None, eos_id: int | None) -> None:
  """Writes config.json, generation_config.json and model.safetensors into `path`."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config(cfg, bos_id=bos_id, eos_id=eos_id), f, indent=2)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": bos_id, "eos_token_id": eos_id}, f, indent=2)
  save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
