"""GGUF (llama.cpp) files: weights, config and tokenizer, read with `gguf`.

Architectures: `llama` (Llama, Mistral, and Mixtral, which llama.cpp converts as `llama` with an
`expert_count`), `qwen2` (q/k/v biases `attn_{q,k,v}.bias`), `qwen3` (q/k norms
`attn_{q,k}_norm`), `phi3` (fused `attn_qkv`, and `ffn_up` holding gate then up rows, as
Phi-3's Hugging Face weights are), `olmo2` (post-norm blocks `post_attention_norm` /
`post_ffw_norm`, q/k norms over all heads), `gemma2` and `gemma3` (sandwich norms
`attn_norm` / `post_attention_norm` / `ffn_norm` / `post_ffw_norm`, stored as 1 + w as
llama.cpp's converter writes them; the per-model constants llama.cpp sets in code rather than
in the file taken as it does: `GEMMA_PATTERNS`, `gemma_softmax_scalar`), `qwen2moe` and
`qwen3moe`. MoE layers use llama.cpp's stacked expert tensors:
`ffn_gate_inp` (router `[E, D]`), `ffn_{gate,up}_exps` `[E, F, D]`, `ffn_down_exps` `[E, D, F]`,
and for shared experts `ffn_{gate,up,down}_shexp` and `ffn_gate_inp_shexp`.

Quantized tensors are dequantized to float32 on the host (F32, F16, BF16, Q8_0, Q4_0, Q4_1,
Q4_K, Q6_K). llama.cpp stores the `llama` architecture's Q and K projections with each head's
rows interleaved for its "normal" RoPE; we undo that to the rotate-half layout of Hugging Face
and our model (the Qwen architectures use rotate-half already).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxllm.checkpoint import hf_format, layouts
from jaxllm.checkpoint.errors import UnsupportedCheckpoint
from jaxllm.config import ModelConfig

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "olmo2", "gemma2", "gemma3",
                           "qwen2moe", "qwen3moe")
# llama.cpp fixes Gemma's local/global layout per architecture (every N-th layer global) and
# Gemma 3's local RoPE base; neither is in the file.
GEMMA_PATTERNS = {"gemma2": 2, "gemma3": 6}
GEMMA3_LOCAL_ROPE_THETA = 10_000.0
# The depths of Gemma's 27B models, whose softmax scale is 1/sqrt(d_model / heads) rather than
# 1/sqrt(head_dim) (llama.cpp tells them apart by depth too).
_GEMMA_27B_DEPTHS = {"gemma2": 46, "gemma3": 62}
# The block variant each architecture implies (MoE ones: `_moe_config`).
_DENSE_VARIANTS = {"llama": {}, "phi3": {}, "qwen2": dict(qkv_bias=True),
                   "qwen3": dict(qk_norm=True),
                   "olmo2": dict(qk_norm=True, qk_norm_over_heads=True, norm_placement="post"),
                   "gemma2": {}, "gemma3": {}}  # Gemma: `_gemma_config`
# Per-layer tensors: llama.cpp's `blk.{i}.<name>.weight` -> HF's `model.layers.{i}.<name>.weight`.
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def layer_names(architecture: str) -> dict[str, str]:
  """LAYER_NAMES as `architecture` has them (q/k norms and biases are added separately)."""
  names = dict(LAYER_NAMES)
  if architecture == "phi3":
    for fused in ("attn_q", "attn_k", "attn_v", "ffn_gate"):
      del names[fused]
    names.update(attn_qkv="self_attn.qkv_proj", ffn_up="mlp.gate_up_proj")
  elif architecture == "olmo2":
    del names["attn_norm"], names["ffn_norm"]
    names.update(post_attention_norm="post_attention_layernorm",
                 post_ffw_norm="post_feedforward_layernorm")
  elif architecture in GEMMA_PATTERNS:
    names.update(ffn_norm="pre_feedforward_layernorm",
                 post_attention_norm="post_attention_layernorm",
                 post_ffw_norm="post_feedforward_layernorm")
  return names


def gemma_softmax_scalar(architecture: str, n_layers: int, d_model: int, n_heads: int,
                         head_dim: int) -> int:
  """Gemma's query_pre_attn_scalar as llama.cpp infers it from the model's shape."""
  return d_model // n_heads if n_layers == _GEMMA_27B_DEPTHS[architecture] else head_dim


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

  def _moe_config(self) -> dict[str, Any]:
    n_experts = int(self._arch("expert_count", 0) or 0)
    if not n_experts:
      if self.architecture not in _DENSE_VARIANTS:
        raise UnsupportedCheckpoint(f"{self.path}: {self.architecture} without expert_count")
      return dict(_DENSE_VARIANTS[self.architecture])
    ffn = int(self._arch("expert_feed_forward_length", 0) or self._arch("feed_forward_length"))
    out = dict(n_experts=n_experts, experts_per_token=int(self._arch("expert_used_count", 2)),
               moe_d_ff=ffn,
               norm_topk_prob=bool(self._arch("expert_weights_norm",
                                              self.architecture != "qwen2moe")))
    shared = int(self._arch("expert_shared_feed_forward_length", 0) or 0)
    if shared:
      if shared % ffn:
        raise UnsupportedCheckpoint(f"{self.path}: shared expert width {shared} is not a "
                                    f"multiple of the expert width {ffn}")
      out.update(n_shared_experts=shared // ffn,
                 shared_expert_gate="blk.0.ffn_gate_inp_shexp.weight" in self.tensors)
    if self.architecture == "qwen2moe":
      out["qkv_bias"] = "blk.0.attn_q.bias" in self.tensors
    if self.architecture == "qwen3moe":
      out["qk_norm"] = True
    return out

  def _gemma_config(self, d_model: int, n_heads: int, head_dim: int) -> dict[str, Any]:
    arch = self.architecture
    n_layers = int(self._arch("block_count"))
    # A Gemma 2 file without a window gets llama.cpp's default, Gemma 2's published 4096.
    window = int(self._arch("attention.sliding_window", 4096 if arch == "gemma2" else 0) or 0)
    pattern = GEMMA_PATTERNS[arch]
    every = pattern if window and n_layers >= pattern else 0
    out = dict(hf_format.GEMMA_BLOCK, qk_norm=arch == "gemma3", global_every=every,
               sliding_window=window,
               query_pre_attn_scalar=float(gemma_softmax_scalar(arch, n_layers, d_model,
                                                                n_heads, head_dim)),
               # llama.cpp's defaults when the file has none (Gemma 2's published caps)
               attn_logit_soft_cap=float(self._arch("attn_logit_softcapping",
                                                    50.0 if arch == "gemma2" else 0.0) or 0),
               final_logit_soft_cap=float(self._arch("final_logit_softcapping",
                                                     30.0 if arch == "gemma2" else 0.0) or 0))
    if arch == "gemma3":
      if every:
        out["rope_local_theta"] = GEMMA3_LOCAL_ROPE_THETA
      elif window:  # shallower than the pattern: every layer local, with the local RoPE
        out.update(rope_theta=GEMMA3_LOCAL_ROPE_THETA, rope_scaling="none")
    return out

  def model_config(self) -> ModelConfig:
    n_heads = int(self._arch("attention.head_count"))
    d_model = int(self._arch("embedding_length"))
    head_dim = int(self._arch("attention.key_length", 0) or self._arch("rope.dimension_count",
                                                                        d_model // n_heads))
    vocab = self._arch("vocab_size") or len(self.metadata["tokenizer.ggml.tokens"])
    scaling = self._arch("rope.scaling.type", "none")
    kwargs = {}
    if scaling == "linear":
      kwargs = dict(rope_scaling="linear",
                    rope_scaling_factor=float(self._arch("rope.scaling.factor", 1.0)))
    elif scaling not in ("none", None):
      raise UnsupportedCheckpoint(f"{self.path}: GGUF rope scaling {scaling!r} is not supported")
    if "rope_factors_long.weight" in self.tensors:
      raise UnsupportedCheckpoint(f"{self.path}: Phi-3's LongRoPE factors are not supported")
    if self.architecture == "olmo2" and self._arch("attention.sliding_window", 0):
      raise UnsupportedCheckpoint(f"{self.path}: OLMo's sliding-window layers are not supported")
    if self.architecture in GEMMA_PATTERNS:
      kwargs.update(self._gemma_config(d_model, n_heads, head_dim))
    keys = dict(
        vocab_size=int(vocab), d_model=d_model, n_layers=int(self._arch("block_count")),
        n_heads=n_heads, n_kv_heads=int(self._arch("attention.head_count_kv", n_heads)),
        head_dim=head_dim, d_ff=int(self._arch("feed_forward_length")),
        max_seq_len=int(self._arch("context_length", 2048)),
        rope_theta=float(self._arch("rope.freq_base", 10_000.0)),
        norm_eps=float(self._arch("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="output.weight" not in self.tensors,
        sliding_window=int(self._arch("attention.sliding_window", 0) or 0), dtype="float32")
    keys.update(**kwargs, **self._moe_config())  # Gemma 3's all-local models replace rope_theta
    return ModelConfig(**keys)

  def tensor(self, name: str) -> np.ndarray:
    """A tensor dequantized to float32, rows first as in the file (`[out, in]` for matrices)."""
    if name not in self.tensors:
      raise UnsupportedCheckpoint(f"{self.path}: tensor {name!r} is missing")
    t = self.tensors[name]
    data = self._gguf.quants.dequantize(t.data, t.tensor_type)
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(data, np.float32).reshape(shape)

  def hf_state_dict(self) -> layouts.LazyState:
    """The weights under Hugging Face names (experts as Qwen names them), Q/K rows back in
    rotate-half order; each tensor is dequantized when it is read."""
    cfg = self.model_config()
    out = {"model.embed_tokens.weight": lambda: self.tensor("token_embd.weight"),
           "model.norm.weight": lambda: weight("output_norm.weight", "output_norm")}
    if not cfg.tie_embeddings:
      out["lm_head.weight"] = lambda: self.tensor("output.weight")
    interleaved = self.architecture == "llama"
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}

    # Gemma's norms are stored as 1 + w, ours (and Hugging Face's) as w.
    shift = 1.0 if self.architecture in GEMMA_PATTERNS else 0.0

    def weight(name, gguf_name):
      w = self.tensor(name)
      if interleaved and gguf_name in heads:
        w = layouts.interleaved_to_half(w, heads[gguf_name])
      if name.endswith("norm.weight"):
        w = w - shift
      return w

    last = {}  # the expert tensor read last: its experts are read one after another

    def expert(name, e):
      if last.get("name") != name:
        last.update(name=name, value=self.tensor(name))
      return last["value"][e]

    for i in range(cfg.n_layers):
      pre = f"model.layers.{i}."
      moe_layer = cfg.n_experts and f"blk.{i}.ffn_gate_inp.weight" in self.tensors
      for gguf_name, hf_name in layer_names(self.architecture).items():
        if moe_layer and gguf_name.startswith("ffn_") and gguf_name != "ffn_norm":
          continue
        out[f"{pre}{hf_name}.weight"] = (
            lambda n=f"blk.{i}.{gguf_name}.weight", g=gguf_name: weight(n, g))
      if cfg.qkv_bias:
        for name in ("q", "k", "v"):
          out[f"{pre}self_attn.{name}_proj.bias"] = (
              lambda n=f"blk.{i}.attn_{name}.bias": self.tensor(n))
      if cfg.qk_norm:
        for name in ("q", "k"):
          out[f"{pre}self_attn.{name}_norm.weight"] = (
              lambda n=f"blk.{i}.attn_{name}_norm.weight": weight(n, n))
      if moe_layer:
        out[f"{pre}mlp.gate.weight"] = lambda n=f"blk.{i}.ffn_gate_inp.weight": self.tensor(n)
        for e in range(cfg.n_experts):
          for n in ("gate", "up", "down"):
            out[f"{pre}mlp.experts.{e}.{n}_proj.weight"] = (
                lambda t=f"blk.{i}.ffn_{n}_exps.weight", e=e: expert(t, e))
        if cfg.n_shared_experts:
          for n in ("gate", "up", "down"):
            out[f"{pre}mlp.shared_expert.{n}_proj.weight"] = (
                lambda t=f"blk.{i}.ffn_{n}_shexp.weight": self.tensor(t))
          if cfg.shared_expert_gate:
            out[f"{pre}mlp.shared_expert_gate.weight"] = (
                lambda t=f"blk.{i}.ffn_gate_inp_shexp.weight": self.tensor(t).reshape(1, -1))
    return layouts.LazyState(out)

  def chat_template(self) -> str | None:
    return self.metadata.get("tokenizer.chat_template")
