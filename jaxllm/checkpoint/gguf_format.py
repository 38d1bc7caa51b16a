"""GGUF (llama.cpp) files: Llama-architecture weights, config and tokenizer, read with `gguf`.

Quantized tensors are dequantized to float32 on the host (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q6_K). llama.cpp stores Q and K projections with each head's rows interleaved for its
"normal" RoPE; we undo that to the rotate-half layout of Hugging Face and our model.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxllm.checkpoint import layouts
from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.config import ModelConfig

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama",)
# Per-layer tensors: llama.cpp's `blk.{i}.<name>.weight` -> HF's `model.layers.{i}.<name>.weight`.
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


class GGUFFile:
  """Metadata, tensors and tokenizer fields of one GGUF file."""

  def __init__(self, path: str | os.PathLike[str]):
    import gguf  # optional until a GGUF file is opened
    self.path = os.fspath(path)
    try:
      self._reader = gguf.GGUFReader(self.path)
    except (ValueError, OSError, IndexError, KeyError) as e:
      raise UnsupportedCheckpoint(f"{self.path} is not a readable GGUF file ({e})") from None
    self._gguf = gguf
    self.metadata: dict[str, Any] = {}
    for key, field in self._reader.fields.items():
      try:
        self.metadata[key] = field.contents()
      except (ValueError, IndexError, UnicodeDecodeError):
        continue  # fields we cannot decode are fields we do not use
    self.tensors = {t.name: t for t in self._reader.tensors}
    self.architecture = self.metadata.get("general.architecture")
    if self.architecture not in SUPPORTED_ARCHITECTURES:
      raise UnsupportedCheckpoint(
          f"{self.path}: GGUF architecture {self.architecture!r} is not supported "
          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    bad = sorted({t.tensor_type.name for t in self._reader.tensors}
                 - set(SUPPORTED_TENSOR_TYPES))
    if bad:
      raise UnsupportedCheckpoint(
          f"{self.path}: GGUF tensor type(s) {', '.join(bad)} are not supported "
          f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)})")

  def _arch(self, key: str, default=None):
    return self.metadata.get(f"{self.architecture}.{key}", default)

  def model_config(self) -> ModelConfig:
    n_heads = int(self._arch("attention.head_count"))
    d_model = int(self._arch("embedding_length"))
    head_dim = int(self._arch("rope.dimension_count", d_model // n_heads))
    vocab = self._arch("vocab_size") or len(self.metadata["tokenizer.ggml.tokens"])
    scaling = self._arch("rope.scaling.type", "none")
    kwargs = {}
    if scaling == "linear":
      kwargs = dict(rope_scaling="linear",
                    rope_scaling_factor=float(self._arch("rope.scaling.factor", 1.0)))
    elif scaling not in ("none", None):
      raise UnsupportedCheckpoint(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
    return ModelConfig(
        vocab_size=int(vocab), d_model=d_model, n_layers=int(self._arch("block_count")),
        n_heads=n_heads, n_kv_heads=int(self._arch("attention.head_count_kv", n_heads)),
        head_dim=head_dim, d_ff=int(self._arch("feed_forward_length")),
        max_seq_len=int(self._arch("context_length", 2048)),
        rope_theta=float(self._arch("rope.freq_base", 10_000.0)),
        norm_eps=float(self._arch("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in self.tensors,
        sliding_window=int(self._arch("attention.sliding_window", 0) or 0),
        dtype="float32", **kwargs)

  def tensor(self, name: str) -> np.ndarray:
    """A tensor dequantized to float32, rows first as in the file (`[out, in]` for matrices)."""
    if name not in self.tensors:
      raise UnsupportedCheckpoint(f"{self.path}: tensor {name!r} is missing")
    t = self.tensors[name]
    data = self._gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(data, np.float32).reshape(shape)

  def hf_state_dict(self) -> dict[str, np.ndarray]:
    """The weights under Hugging Face Llama names, Q/K rows back in rotate-half order."""
    cfg = self.model_config()
    out = {"model.embed_tokens.weight": self.tensor("token_embd.weight"),
           "model.norm.weight": self.tensor("output_norm.weight")}
    if not cfg.tie_embeddings:
      out["lm_head.weight"] = self.tensor("output.weight")
    for i in range(cfg.n_layers):
      for gguf_name, hf_name in LAYER_NAMES.items():
        w = self.tensor(f"blk.{i}.{gguf_name}.weight")
        if gguf_name == "attn_q":
          w = layouts.interleaved_to_half(w, cfg.n_heads)
        elif gguf_name == "attn_k":
          w = layouts.interleaved_to_half(w, cfg.n_kv_heads)
        out[f"model.layers.{i}.{hf_name}.weight"] = w
    return out

  def chat_template(self) -> str | None:
    return self.metadata.get("tokenizer.chat_template")
