"""Writes small GGUF files (random Llama weights) with the `gguf` package, for tests."""

import gguf
import numpy as np

from jaxllm.checkpoint import layouts
from jaxllm.checkpoint.gguf_format import LAYER_NAMES, layer_names
from jaxllm.config import ModelConfig

TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab"]


def _writer(path, cfg: ModelConfig, arch: str, feed_forward: int):
  """A GGUFWriter with the model and tokenizer metadata of `cfg` written."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(feed_forward)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  if cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
  if cfg.attn_logit_soft_cap or arch == "gemma2":
    w.add_attn_logit_softcapping(cfg.attn_logit_soft_cap)
  if cfg.final_logit_soft_cap or arch == "gemma2":
    w.add_final_logit_softcapping(cfg.final_logit_soft_cap)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  tokens = (TOKENS + [f"t{i}" for i in range(cfg.vocab_size)])[:cfg.vocab_size]
  w.add_token_list(tokens)
  w.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
  w.add_token_merges(["a b"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  return w


def _finish(w):
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def write_llama_gguf(path, cfg: ModelConfig, params: dict, *, qtype="F32", arch="llama"):
  """A GGUF file of `params` (jaxllm layout) in llama.cpp's layout and naming."""
  w = _writer(path, cfg, arch, cfg.d_ff)
  qt = getattr(gguf.GGMLQuantizationType, qtype)
  state = layouts.hf_from_params(params, cfg, fused=arch == "phi3")

  def add(name, array):
    array = np.ascontiguousarray(array, np.float32)
    if arch.startswith("gemma") and name.endswith("norm.weight"):
      array = array + 1.0  # llama.cpp's converter stores Gemma's (1 + w)
    if qt == gguf.GGMLQuantizationType.F32 or array.ndim == 1:
      w.add_tensor(name, array)
    else:
      w.add_tensor(name, gguf.quants.quantize(array, qt), raw_dtype=qt)

  add("token_embd.weight", state["model.embed_tokens.weight"])
  add("output_norm.weight", state["model.norm.weight"])
  if not cfg.tie_embeddings:
    add("output.weight", state["lm_head.weight"])
  for i in range(cfg.n_layers):
    for g_name, hf_name in layer_names(arch).items():
      t = state[f"model.layers.{i}.{hf_name}.weight"]
      if arch == "llama" and g_name == "attn_q":  # the Qwen architectures keep rotate-half
        t = layouts.half_to_interleaved(t, cfg.n_heads)
      elif arch == "llama" and g_name == "attn_k":
        t = layouts.half_to_interleaved(t, cfg.n_kv_heads)
      add(f"blk.{i}.{g_name}.weight", t)
    for name in ("q", "k", "v"):
      if cfg.qkv_bias:
        add(f"blk.{i}.attn_{name}.bias", state[f"model.layers.{i}.self_attn.{name}_proj.bias"])
      if cfg.qk_norm and name != "v":
        add(f"blk.{i}.attn_{name}_norm.weight",
            state[f"model.layers.{i}.self_attn.{name}_norm.weight"])
  _finish(w)


def write_mixtral_gguf(path, cfg: ModelConfig, params: dict):
  """An MoE model as llama.cpp converts Mixtral: architecture `llama` with `expert_count`, the
  experts stacked in `ffn_{gate,up,down}_exps`, the router in `ffn_gate_inp` (float32)."""
  w = _writer(path, cfg, "llama", cfg.moe_d_ff)
  w.add_expert_count(cfg.n_experts)
  w.add_expert_used_count(cfg.experts_per_token)
  state = layouts.hf_from_params(params, cfg, "mixtral")
  add = lambda name, a: w.add_tensor(name, np.ascontiguousarray(a, np.float32))
  add("token_embd.weight", state["model.embed_tokens.weight"])
  add("output_norm.weight", state["model.norm.weight"])
  if not cfg.tie_embeddings:
    add("output.weight", state["lm_head.weight"])
  for i in range(cfg.n_layers):
    pre = f"model.layers.{i}."
    for g_name, hf_name in LAYER_NAMES.items():
      if g_name.startswith("ffn_") and g_name != "ffn_norm":
        continue
      t = state[f"{pre}{hf_name}.weight"]
      if g_name in ("attn_q", "attn_k"):
        t = layouts.half_to_interleaved(t, cfg.n_heads if g_name == "attn_q" else cfg.n_kv_heads)
      add(f"blk.{i}.{g_name}.weight", t)
    moe = pre + "block_sparse_moe."
    add(f"blk.{i}.ffn_gate_inp.weight", state[moe + "gate.weight"])
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
      add(f"blk.{i}.ffn_{ours}_exps.weight",
          np.stack([state[f"{moe}experts.{e}.{theirs}.weight"] for e in range(cfg.n_experts)]))
  _finish(w)
