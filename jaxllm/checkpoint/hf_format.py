"""Hugging Face model directories: config.json + *.safetensors (+ tokenizer files).

Reads Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2, Gemma 2, Gemma 3 (text), Mixtral, Qwen2-MoE
and Qwen3-MoE configs (GQA, RoPE theta, sliding window, tied embeddings, experts, shared
experts, q/k/v biases, q/k norms per head or over all heads, post-norm and sandwich blocks,
Gemma's local/global layers, soft caps and scales, and the RoPE scalings linear, llama3,
dynamic NTK and YaRN), single-file or sharded safetensors (any float dtype, converted to
float32), and writes directories that `transformers.AutoModelForCausalLM.from_pretrained` loads
(static NTK written as the plain RoPE theta it amounts to; ALiBi models refused: none of these
families has ALiBi).
"""

from __future__ import annotations

import collections.abc
import json
import os
from typing import Any

import numpy as np

from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.config import ModelConfig
from jaxllm.model import positions

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2", "gemma2",
                         "gemma3_text", "mixtral", "qwen2_moe", "qwen3_moe")
GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")
# The block every Gemma 2/3 checkpoint has (Hugging Face's or GGUF's): sandwich norms scaling by
# (1 + w), embeddings times sqrt(d), GeGLU.
GEMMA_BLOCK = dict(norm_placement="sandwich", norm_offset=1.0, embed_scale=True,
                   mlp_activation="gelu_tanh")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
# Families whose checkpoints hold a model that another family's layout holds too: the export
# writes them only when asked (`hf_config(..., model_type=)`), Llama otherwise.
ALIASES = {"phi3": "llama"}


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
  # Qwen2's q/k/v biases are implied by the family; attention_bias elsewhere (Llama, Qwen3)
  # also biases the output projection, which jaxllm does not have.
  if hf.get("mlp_bias") or hf.get("attention_bias"):
    raise UnsupportedCheckpoint(f"{where}: attention/MLP biases are not supported for "
                                f"{model_type}")
  gemma = model_type in GEMMA_MODEL_TYPES
  act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
  if act not in (("gelu_pytorch_tanh", "gelu_tanh") if gemma else ("silu",)):
    raise UnsupportedCheckpoint(f"{where}: hidden_act={act!r} is not supported for "
                                f"{model_type}")
  if hf.get("use_bidirectional_attention"):
    raise UnsupportedCheckpoint(f"{where}: bidirectional attention is not supported")
  rope = _rope_params(hf)
  local_rope = {}
  if isinstance(rope.get("full_attention"), dict):  # Gemma 3: RoPE per layer type
    local_rope = rope.get("sliding_attention") or {}
    rope = dict(rope["full_attention"])
  partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
  if partial != 1.0:
    raise UnsupportedCheckpoint(f"{where}: partial_rotary_factor={partial} is not supported "
                                "(RoPE over the whole head only)")
  kind = rope.get("rope_type", rope.get("type", "default")) or "default"
  scaling: dict[str, Any] = {}
  if kind == "linear":
    scaling = dict(rope_scaling="linear", rope_scaling_factor=float(rope["factor"]))
  elif kind == "llama3":
    scaling = dict(rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                   rope_low_freq_factor=float(rope["low_freq_factor"]),
                   rope_high_freq_factor=float(rope["high_freq_factor"]),
                   rope_original_max_len=int(rope["original_max_position_embeddings"]))
  elif kind == "dynamic":
    # Hugging Face grows dynamic NTK from max_position_embeddings; ours from
    # rope_original_max_len, leaving max_seq_len for the extended context.
    original = int(hf.get("max_position_embeddings", 2048))
    scaling = dict(rope_scaling="dynamic", rope_scaling_factor=float(rope["factor"]),
                   rope_original_max_len=original,
                   max_seq_len=int(original * float(rope["factor"])))
  elif kind == "yarn":
    scaling = _yarn_config(hf, rope)
  elif kind != "default":
    raise UnsupportedCheckpoint(f"{where}: rope scaling {kind!r} is not supported "
                                "(supported: linear, llama3, dynamic, yarn)")
  n_heads = int(hf["num_attention_heads"])
  d_model = int(hf["hidden_size"])
  window = _window(hf, model_type, where)
  moe = _moe_config(hf, model_type, where) if model_type in MOE_MODEL_TYPES else {}
  if gemma:
    window, gemma_keys = _gemma_config(hf, window, local_rope, rope, where)
    scaling.update(gemma_keys)
  variant = {"qwen2": dict(qkv_bias=True),
             "qwen3": dict(qk_norm=True),
             "olmo2": dict(qk_norm=True, qk_norm_over_heads=True, norm_placement="post"),
             }.get(model_type, {})
  scaling.setdefault("max_seq_len", int(hf.get("max_position_embeddings", 2048)))
  keys = dict(
      vocab_size=int(hf["vocab_size"]), d_model=d_model, n_layers=int(hf["num_hidden_layers"]),
      n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
      head_dim=int(hf.get("head_dim") or d_model // n_heads),
      d_ff=int(hf["intermediate_size"]),
      rope_theta=float(rope.get("rope_theta", 10_000.0)),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
      sliding_window=window, dtype="float32")
  keys.update({**scaling, **moe, **variant})  # Gemma's all-local models replace rope_theta
  return ModelConfig(**keys)


def _gemma_config(hf, window, local_rope, rope, where) -> tuple[int, dict[str, Any]]:
  """(sliding window, ModelConfig keys) of a Gemma 2/3 config: sandwich norms of (1 + w), GeGLU,
  embeddings times sqrt(d), soft caps, and local layers with every `global_every`-th global."""
  n = int(hf["num_hidden_layers"])
  kinds = hf.get("layer_types") or [
      "sliding_attention" if (i + 1) % int(hf.get("sliding_window_pattern") or 2) else
      "full_attention" for i in range(n)]
  is_global = [k == "full_attention" for k in kinds]
  every = is_global.index(True) + 1 if any(is_global) else 0
  if every and is_global != [(i + 1) % every == 0 for i in range(n)]:
    raise UnsupportedCheckpoint(f"{where}: layer_types {kinds} are not a pattern jaxllm "
                                "runs (layer i global iff (i + 1) % N == 0)")
  window = int(hf.get("sliding_window") or 0) if not all(is_global) else 0
  if every and (every == 1 or not window):
    every, window = 0, 0  # every layer global
  keys: dict[str, Any] = dict(
      GEMMA_BLOCK, query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or 0),
      final_logit_soft_cap=float(hf.get("final_logit_softcapping") or 0),
      attn_logit_soft_cap=float(hf.get("attn_logit_softcapping") or 0),
      qk_norm=hf.get("model_type") == "gemma3_text", global_every=every)
  local_theta = local_rope.get("rope_theta", hf.get("rope_local_base_freq"))
  if every and local_theta is not None:
    if local_rope.get("rope_type", "default") != "default":
      raise UnsupportedCheckpoint(f"{where}: scaled RoPE on the local layers is not supported")
    keys["rope_local_theta"] = float(local_theta)
  elif not every and window and local_theta is not None and float(local_theta) != float(
      rope.get("rope_theta", 10_000.0)):
    # Every layer local (a model shallower than the pattern): the local base is the model's.
    keys["rope_theta"] = float(local_theta)
    keys["rope_scaling"] = "none"
  return window, keys


def _window(hf: dict[str, Any], model_type: str, where: str) -> int:
  """The sliding window every layer has (0: none); refuses windows on some layers only."""
  if model_type in GEMMA_MODEL_TYPES:
    return 0  # `_gemma_config`
  if model_type in ("mistral", "mixtral", "phi3"):
    return int(hf.get("sliding_window") or 0)
  if not hf.get("use_sliding_window"):
    return 0
  n = int(hf["num_hidden_layers"])
  kinds = hf.get("layer_types") or [
      "sliding_attention" if i >= int(hf.get("max_window_layers") or 0) else "full_attention"
      for i in range(n)]
  if set(kinds) != {"sliding_attention"}:
    raise UnsupportedCheckpoint(f"{where}: sliding windows on some layers only "
                                f"({kinds.count('sliding_attention')} of {n}) are not supported")
  return int(hf.get("sliding_window") or 0)


def _yarn_config(hf: dict[str, Any], rope: dict[str, Any]) -> dict[str, Any]:
  """ModelConfig keys of a YaRN `rope_scaling`; the attention factor is resolved here as
  transformers does (explicit, else from mscale / mscale_all_dim, else from the factor)."""
  max_pos = int(hf.get("max_position_embeddings", 2048))
  original = int(rope.get("original_max_position_embeddings") or max_pos)
  factor = float(rope.get("factor") or max_pos / original)
  attention_factor = rope.get("attention_factor")
  if attention_factor is None:
    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    mscale = positions.yarn_mscale
    attention_factor = (mscale(factor, m) / mscale(factor, m_all) if m and m_all
                        else mscale(factor))
  return dict(rope_scaling="yarn", rope_scaling_factor=factor, rope_original_max_len=original,
              rope_yarn_beta_fast=float(rope.get("beta_fast") or 32),
              rope_yarn_beta_slow=float(rope.get("beta_slow") or 1),
              rope_yarn_truncate=bool(rope.get("truncate", True)),
              rope_attention_factor=float(attention_factor))


def _moe_config(hf: dict[str, Any], model_type: str, where: str) -> dict[str, Any]:
  """ModelConfig MoE keys from a Mixtral / Qwen2-MoE / Qwen3-MoE config."""
  n_experts = int(hf.get("num_local_experts") or hf.get("num_experts") or 0)
  k = int(hf.get("num_experts_per_tok") or 2)
  if model_type == "mixtral":
    return dict(n_experts=n_experts, experts_per_token=k, moe_d_ff=int(hf["intermediate_size"]),
                norm_topk_prob=True)
  F = int(hf["moe_intermediate_size"])
  step = int(hf.get("decoder_sparse_step") or 1)
  dense = sorted(int(i) for i in hf.get("mlp_only_layers") or ())
  first = len(dense)
  if dense != list(range(first)) or first % step:
    raise UnsupportedCheckpoint(
        f"{where}: mlp_only_layers={dense} with decoder_sparse_step={step} is not a layout "
        "jaxllm has (a prefix of dense layers whose length is a multiple of the step)")
  out = dict(n_experts=n_experts, experts_per_token=k, moe_d_ff=F, moe_every=step,
             first_dense_layers=first, norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
  if model_type == "qwen2_moe":
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    if shared % F:
      raise UnsupportedCheckpoint(f"{where}: shared_expert_intermediate_size={shared} is not a "
                                  f"multiple of moe_intermediate_size={F}")
    out.update(n_shared_experts=shared // F, shared_expert_gate=shared > 0,
               qkv_bias=bool(hf.get("qkv_bias", True)))
  else:
    out.update(qk_norm=True)
  return out


def model_type_for(cfg: ModelConfig, prefer: str | None = None) -> str:
  """The transformers architecture that holds `cfg`; raises UnsupportedCheckpoint if none does.

  Dense: gemma3_text (with q/k norms) or gemma2 with Gemma's sandwich blocks, olmo2 with
  post-norm blocks and q/k norms over all heads, qwen3 with per-head q/k norms, qwen2 with q/k/v
  biases, else llama (mistral with a window; `prefer="phi3"` writes
  Phi-3's fused layout instead). MoE: qwen3_moe with q/k norms, qwen2_moe with shared experts
  (and their gate), mixtral otherwise (every layer MoE, k weights renormalised).
  """
  def refuse(why):
    raise UnsupportedCheckpoint(f"no Hugging Face architecture holds this model: {why} "
                                "(export --format=orbax instead)")
  if cfg.position_encoding != "rope":
    refuse(f"position_encoding={cfg.position_encoding} (these families' are RoPE)")
  gemma = [getattr(cfg, key) == value for key, value in GEMMA_BLOCK.items()]
  if any(gemma):
    if not all(gemma) or cfg.qkv_bias or cfg.qk_norm_over_heads or cfg.n_experts:
      refuse("Gemma has sandwich norms of (1 + w), embeddings times sqrt(d) and GeGLU, all "
             "four, and no biases, experts or q/k norms over all heads")
    family = "gemma3_text" if cfg.qk_norm else "gemma2"
    if family == "gemma2" and (cfg.rope_local_theta or cfg.rope_scaling != "none"):
      refuse("Gemma 2 has one unscaled RoPE for every layer")
    if prefer is not None and prefer != family:
      refuse(f"it is a {family} model, not {prefer}")
    return family
  if cfg.global_every or cfg.final_logit_soft_cap or cfg.attn_logit_soft_cap or (
      cfg.query_pre_attn_scalar):
    refuse("local and global layers, soft caps and query_pre_attn_scalar are Gemma's")
  if (cfg.norm_placement == "post") != cfg.qk_norm_over_heads or (
      cfg.norm_placement == "post" and (cfg.n_experts or cfg.qkv_bias or cfg.sliding_window)):
    refuse("OLMo 2 has post-norm blocks with q/k norms over all heads, both, and no experts, "
           "biases or window")
  if not cfg.n_experts:
    if cfg.norm_placement == "post":
      family = "olmo2"
    elif cfg.qk_norm:
      if cfg.qkv_bias:
        refuse("q/k/v biases with q/k norms (Qwen3's attention_bias biases o_proj too)")
      family = "qwen3"
    elif cfg.qkv_bias:
      family = "qwen2"
    else:
      family = "mistral" if cfg.sliding_window > 0 else "llama"
  else:
    family = _moe_family(cfg, refuse)
  if prefer is not None and prefer != family:
    if ALIASES.get(prefer) != family.replace("mistral", "llama"):
      refuse(f"it is a {family} model, not {prefer}")
    family = prefer
  return family


def _moe_family(cfg: ModelConfig, refuse) -> str:
  if cfg.router != "softmax" or cfg.router_bias_update_rate > 0:
    refuse(f"router={cfg.router} with a routing bias")
  if cfg.qk_norm:
    if cfg.n_shared_experts or cfg.qkv_bias:
      refuse("q/k norms with shared experts or q/k/v biases")
    family = "qwen3_moe"
  elif cfg.n_shared_experts or cfg.qkv_bias:
    if not (cfg.n_shared_experts and cfg.shared_expert_gate and cfg.qkv_bias):
      refuse("Qwen2-MoE has shared experts with a gate and q/k/v biases, all three")
    family = "qwen2_moe"
  else:
    if cfg.first_dense_layers or cfg.moe_every != 1 or not cfg.norm_topk_prob:
      refuse("Mixtral has every layer MoE and renormalised top-k weights")
    family = "mixtral"
  if family != "mixtral":
    if cfg.sliding_window:
      refuse("a sliding window on a Qwen MoE model")
    if cfg.first_dense_layers % cfg.moe_every or (cfg.n_layers - cfg.first_dense_layers) % (
        cfg.moe_every):
      refuse(f"first_dense_layers={cfg.first_dense_layers} / moe_every={cfg.moe_every} "
             "differ from Qwen's decoder_sparse_step layout")
  return family


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
                  "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM"}


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None,
              model_type: str | None = None) -> dict[str, Any]:
  """A transformers config.json dict for `cfg` (family by `model_type_for(cfg, model_type)`)."""
  model_type = model_type_for(cfg, model_type)
  out: dict[str, Any] = {
      "architectures": [_ARCHITECTURES[model_type]], "model_type": model_type,
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
      "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "torch_dtype": "float32", "bos_token_id": bos_id, "eos_token_id": eos_id,
      # Explicitly none: some families' defaults (Phi-3: 32000) lie outside other vocabularies.
      "pad_token_id": None,
  }
  if model_type in ("llama", "olmo2"):
    out.update(attention_bias=False, mlp_bias=False)
  elif model_type == "qwen3":
    out.update(attention_bias=False)
  if model_type in ("qwen2", "qwen3"):
    window = cfg.sliding_window
    out.update(use_sliding_window=bool(window), sliding_window=window or None,
               max_window_layers=0,
               layer_types=[("sliding" if window else "full") + "_attention"] * cfg.n_layers)
  F = cfg.moe_d_ff or cfg.d_ff
  if model_type == "mixtral":
    out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
               intermediate_size=F, router_aux_loss_coef=0.0)
  elif model_type in ("qwen2_moe", "qwen3_moe"):
    out.update(num_experts=cfg.n_experts, num_experts_per_tok=cfg.experts_per_token,
               moe_intermediate_size=F, norm_topk_prob=cfg.norm_topk_prob,
               decoder_sparse_step=cfg.moe_every,
               mlp_only_layers=list(range(cfg.first_dense_layers)), router_aux_loss_coef=0.0,
               use_sliding_window=False)
    if model_type == "qwen2_moe":
      out.update(shared_expert_intermediate_size=cfg.n_shared_experts * F, qkv_bias=True)
    else:
      out.update(attention_bias=False)
  if cfg.rope_scaling == "ntk":  # static NTK is plain RoPE with a larger theta
    out["rope_theta"] = positions.ntk_theta(cfg.rope_theta, cfg.rope_scaling_factor,
                                           cfg.head_dim)
  elif cfg.rope_scaling == "dynamic":
    out["rope_scaling"] = {"rope_type": "dynamic", "factor": cfg.rope_scaling_factor}
    out["max_position_embeddings"] = cfg.rope_original_max_len
  elif cfg.rope_scaling == "yarn":
    out["rope_scaling"] = {
        "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
        "original_max_position_embeddings": cfg.rope_original_max_len,
        "beta_fast": cfg.rope_yarn_beta_fast, "beta_slow": cfg.rope_yarn_beta_slow,
        "attention_factor": positions.yarn_attention_factor(cfg)}
    if not cfg.rope_yarn_truncate:
      out["rope_scaling"]["truncate"] = False
  elif cfg.rope_scaling == "linear":
    out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling_factor}
  elif cfg.rope_scaling == "llama3":
    out["rope_scaling"] = {
        "rope_type": "llama3", "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_len}
  if model_type in ("mistral", "mixtral", "phi3") and cfg.sliding_window:
    out["sliding_window"] = cfg.sliding_window
  if model_type in GEMMA_MODEL_TYPES:
    _gemma_hf_config(out, cfg)
  return out


def _gemma_hf_config(out: dict[str, Any], cfg: ModelConfig) -> None:
  """The Gemma keys of `hf_config`: activation, scales, caps, layer types and their RoPE."""
  every = cfg.global_every
  window = cfg.sliding_window
  kinds = ["sliding_attention" if window and (not every or (i + 1) % every) else
           "full_attention" for i in range(cfg.n_layers)]
  del out["hidden_act"]
  out.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
             # transformers types it int
             query_pre_attn_scalar=int(cfg.query_pre_attn_scalar or cfg.head_dim),
             sliding_window=window or None, layer_types=kinds,
             final_logit_softcapping=cfg.final_logit_soft_cap or None,
             attn_logit_softcapping=cfg.attn_logit_soft_cap or None)
  if out["model_type"] == "gemma3_text":
    full = dict(out.pop("rope_scaling", None) or {"rope_type": "default"},
                rope_theta=out.pop("rope_theta"))
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or full["rope_theta"]}
    if not every and window:  # every layer local: they rotate with the model's one RoPE
      local = full
    out["rope_parameters"] = {"full_attention": full, "sliding_attention": local}


def read_config(path: str) -> dict[str, Any]:
  try:
    with open(os.path.join(path, "config.json")) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UnsupportedCheckpoint(f"{path}/config.json is unreadable: {e}") from None


class SafetensorsState(collections.abc.Mapping):
  """The tensors of a directory's safetensors files (sharded or not), read one at a time as
  float32 numpy when asked for: converting a checkpoint never holds it twice in host memory."""

  def __init__(self, files: list[str]):
    from safetensors import SafetensorError, safe_open
    self._file: dict[str, str] = {}
    for file in files:
      try:
        with safe_open(file, framework="flax") as f:
          self._file.update(dict.fromkeys(f.keys(), file))
      except (SafetensorError, OSError, ValueError) as e:
        raise UnsupportedCheckpoint(f"{file} is corrupt or truncated: {e}") from None

  def __getitem__(self, key: str) -> np.ndarray:
    from safetensors import SafetensorError, safe_open
    file = self._file[key]
    try:
      # "flax" reads bfloat16 too (numpy has no bfloat16).
      with safe_open(file, framework="flax") as f:
        return np.asarray(f.get_tensor(key), dtype=np.float32)
    except (SafetensorError, OSError, ValueError) as e:
      raise UnsupportedCheckpoint(f"{file} is corrupt or truncated: {e}") from None

  def __iter__(self):
    return iter(self._file)

  def __len__(self) -> int:
    return len(self._file)


def read_state_dict(path: str) -> SafetensorsState:
  """The directory's safetensors tensors by name (read lazily, as float32 numpy)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise UnsupportedCheckpoint(f"{path} has no .safetensors files")
  return SafetensorsState([os.path.join(path, name) for name in files])


def write(path: str, cfg: ModelConfig, state: dict[str, np.ndarray], *,
          bos_id: int | None, eos_id: int | None, model_type: str | None = None) -> None:
  """Writes config.json, generation_config.json and model.safetensors into `path`."""
  from safetensors.numpy import save_file
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config(cfg, bos_id=bos_id, eos_id=eos_id, model_type=model_type), f, indent=2)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": bos_id, "eos_token_id": eos_id}, f, indent=2)
  weights = os.path.join(path, "model.safetensors")
  save_file(state, weights, metadata={"format": "pt"})
  # safetensors writes through a private temporary file (mode 600); give the weights the mode
  # the JSON files beside them got (0666 less the umask), so that others can read the export.
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(weights, 0o666 & ~umask)
