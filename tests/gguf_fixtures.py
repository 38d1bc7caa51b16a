"""Writes small GGUF files (random Llama weights) with the `gguf` package, for tests."""

import gguf
import numpy as np

from jaxllm.checkpoint import layouts
from jaxllm.checkpoint.gguf_format import LAYER_NAMES
from jaxllm.config import ModelConfig

TOKENS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "ab"]


def write_llama_gguf(path, cfg: ModelConfig, params: dict, *, qtype="F32", arch="llama"):
  """A GGUF file of `params` (jaxllm layout) in llama.cpp's layout and naming."""
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(cfg.n_layers)
  w.add_context_length(cfg.max_seq_len)
  w.add_embedding_length(cfg.d_model)
  w.add_feed_forward_length(cfg.d_ff)
  w.add_head_count(cfg.n_heads)
  w.add_head_count_kv(cfg.n_kv_heads)
  w.add_rope_dimension_count(cfg.head_dim)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("gpt2")
  tokens = (TOKENS + [f"t{i}" for i in range(cfg.vocab_size)])[:cfg.vocab_size]
  w.add_token_list(tokens)
  w.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
  w.add_token_merges(["a b"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  qt = getattr(gguf.GGMLQuantizationType, qtype)
  state = layouts.hf_from_params(params, cfg)

  def add(name, array):
    array = np.ascontiguousarray(array, np.float32)
    if qt == gguf.GGMLQuantizationType.F32 or array.ndim == 1:
      w.add_tensor(name, array)
    else:
      w.add_tensor(name, gguf.quants.quantize(array, qt), raw_dtype=qt)

  add("token_embd.weight", state["model.embed_tokens.weight"])
  add("output_norm.weight", state["model.norm.weight"])
  for i in range(cfg.n_layers):
    for g_name, hf_name in LAYER_NAMES.items():
      t = state[f"model.layers.{i}.{hf_name}.weight"]
      if g_name == "attn_q":
        t = layouts.half_to_interleaved(t, cfg.n_heads)
      elif g_name == "attn_k":
        t = layouts.half_to_interleaved(t, cfg.n_kv_heads)
      add(f"blk.{i}.{g_name}.weight", t)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
