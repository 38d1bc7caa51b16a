"""`jaxllm.load(path)`: any supported checkpoint, ready for logits, generation and chat.

`path` is a training workdir (or `<workdir>/checkpoints/<step>`), a directory written by
`jaxllm.convert --format=orbax`, a Hugging Face directory, or a `.gguf` file.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxllm.checkpoint import convert
from jaxllm.config import KV_CACHE_DTYPES, ModelConfig
from jaxllm.data import chat as chat_lib
from jaxllm.inference import generate as generate_lib
from jaxllm.inference import sampling, speculative
from jaxllm.model import transformer
from jaxllm.parallel import placement


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig  # what the params implement (KV heads replicated for the mesh, if so)
  graphdef: Any
  params: Any
  tokenizer: Any
  kind: str
  mesh: Mesh | None = None  # where the params live (None: one device)

  def logits(self, ids) -> jax.Array:
    """float32 `[B, T, V]` logits of a full forward pass over int ids `[B, T]`."""
    with placement.in_mesh(self.mesh):
      return _forward(self.graphdef, self.params, jnp.asarray(ids, jnp.int32))

  def prompt_ids(self, text: str) -> list[int]:
    """Token ids of a raw-text prompt, with BOS first where the model expects one."""
    ids = self.tokenizer.encode(text)
    bos = self.tokenizer.bos_id
    return ([bos] if self.tokenizer.add_bos and bos >= 0 else []) + ids

  def chat_ids(self, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template (`tools`: OpenAI
    tool definitions, for templates that render them), ending with the assistant's opening
    unless `add_generation_prompt` is false."""
    template = self.tokenizer.chat_template
    if not template:
      raise ValueError("this model has no chat template; use a prompt instead")
    return self.tokenizer.encode(chat_lib.render(
        template, messages, self.tokenizer, add_generation_prompt=add_generation_prompt,
        tools=tools))

  def generate(self, prompt: str | Sequence[int] | Sequence[Sequence[int]], *,
               max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
               frequency_penalty: float = 0.0, presence_penalty: float = 0.0, seed: int = 0,
               stop: str | Sequence[str] = (), stop_token_ids: Sequence[int] = (),
               cache: str = "contiguous", kv_cache_dtype: str = "float32",
               draft: speculative.Draft | None = None, k: int = 4, details: bool = False,
               sink_tokens: int = 0, stream_window: int = 0,
               on_tokens: generate_lib.OnTokens | None = None):
    """Continues a text prompt (returns text), or token prompts (returns lists of ids).

    `cache` is the KV layout (contiguous | paged) and `kv_cache_dtype` its storage (float32 |
    bfloat16 | int8: int8 values with a scale per token and head).
    `draft` (`speculative.ngram_draft()`, `.layer_skip_draft(...)`, `.model_draft(...)`)
    turns on speculative decoding with `k` proposals per step. With `details=True` every
    result is a `Generation` (tokens, logprobs, finish_reason; `.text` for text prompts).
    `stream_window` > 0: StreamingLLM generation in constant memory (contiguous cache), every
    token attending to the first `sink_tokens` tokens and the `stream_window` latest, so prompt
    and output may run past the model's context. `on_tokens` is called on the host after every
    decoding step with the tokens so far (`generate_lib.OnTokens`; one device; what
    `text_stream.TextStream` streams as text).
    """
    sp = sampling.SamplingParams(
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
        repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty, seed=seed, max_tokens=max_tokens, stop=stop,
        stop_token_ids=tuple(stop_token_ids))
    text_in = isinstance(prompt, str)
    if text_in:
      prompts = [self.prompt_ids(prompt)]
    elif prompt and np.ndim(prompt[0]) == 0:
      prompts = [list(prompt)]
    else:
      prompts = [list(p) for p in prompt]
    if kv_cache_dtype not in KV_CACHE_DTYPES:
      raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} must be one of {KV_CACHE_DTYPES}")
    common = dict(eos_id=self.tokenizer.eos_id, max_seq_len=self.config.max_seq_len, cache=cache,
                  cache_dtype=jnp.dtype(kv_cache_dtype))
    stream = generate_lib.stream_of(sink_tokens, stream_window)
    if stream is not None and draft is not None:
      raise ValueError("streaming generation does not take a speculative draft")
    if draft is None:
      results = generate_lib.generate_requests(self.graphdef, self.params, prompts,
                                               [sp] * len(prompts), stream=stream,
                                               on_tokens=on_tokens, **common)
    else:
      results, _ = speculative.speculative_generate(self.graphdef, self.params, prompts,
                                                    [sp] * len(prompts), draft, k=k,
                                                    on_tokens=on_tokens, **common)
    for r in results:
      if sp.stop:
        ids, r.text, hit = sampling.apply_stop_strings(r.tokens, sp.stop, self.tokenizer.decode)
        if hit:
          r.tokens, r.logprobs, r.finish_reason = ids, r.logprobs[:len(ids)], "stop"
      else:
        r.text = self.tokenizer.decode(r.tokens)
    if details:
      return results[0] if text_in else results
    return results[0].text if text_in else [r.tokens for r in results]

  def chat(self, message: str, **kwargs) -> str:
    """The model's reply to one user message (chat template applied)."""
    ids = self.chat_ids([{"role": "user", "content": message}])
    return self.generate([ids], details=True, **kwargs)[0].text

  def quantized(self, bits: int = 4, group_size: int | None = None, *, head_bits: int = 0,
                head_group_size: int | None = None) -> LoadedModel:
    """This model with its block weights rounded to int8/int4 in memory (`jaxllm.quantize`
    writes GPTQ/AWQ checkpoints); group_size defaults to per-channel for int8, 128 for int4.
    `head_bits` 8 or 4 also rounds the embedding and head (0 keeps them in float), per vocab
    row for int8 and in groups of `head_group_size` (default 32) for int4."""
    from jaxllm.lora.weight import is_bank, is_lora
    from jaxllm.quant import params as qparams
    if any(is_lora(w) or is_bank(w) for w in qparams.flatten(self.params).values()):
      raise ValueError("this model holds LoRA adapters, which stay float: merge them into the "
                       "checkpoint first (jaxllm lora merge), or draft with ngram or layer_skip")
    group = group_size if group_size is not None else (0 if bits == 8 else 128)
    head_group = (head_group_size if head_group_size is not None
                  else qparams.default_head_group(head_bits))
    params, _ = qparams.quantize_params(self.params, qparams.QuantSpec(
        bits=bits, group_size=group, head_bits=head_bits, head_group_size=head_group))
    if self.mesh is not None:
      params = jax.device_put(params, placement.qtensor_shardings(
          params, transformer.logical_axes(self.config), self.mesh))
    return dataclasses.replace(self, params=params)

  def draft(self, spec: str) -> speculative.Draft:
    """A speculative draft from a short spec: `ngram[:N]` (prompt lookup over the last N
    tokens, default 3), `layer_skip:N` (this model's first N layers), `int4[:G]` / `int8`
    (this model's weights rounded to int4 in groups of G (default 128) or int8), or a
    checkpoint path (a smaller or quantized model with the same tokenizer)."""
    kind, _, arg = spec.partition(":")
    try:
      if kind == "ngram":
        return speculative.ngram_draft(int(arg) if arg else 3)
      if kind == "layer_skip":
        return speculative.layer_skip_draft(self.graphdef, self.params, int(arg))
      if kind in ("int4", "int8"):
        low = self.quantized(int(kind[3]), int(arg) if arg else None)
        return speculative.model_draft(low.graphdef, low.params)
    except ValueError as e:
      raise ValueError(f"draft {spec!r}: {e}") from None
    other = load(spec, mesh=self.mesh)
    if other.config.vocab_size != self.config.vocab_size:
      raise ValueError(f"draft {spec!r} has vocabulary {other.config.vocab_size}, this model "
                       f"{self.config.vocab_size}: it needs the same tokenizer")
    return speculative.model_draft(other.graphdef, other.params)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids_BT):
  return nnx.merge(graphdef, params)(ids_BT)


def load(path: str | os.PathLike[str], mesh: Mesh | str | None = None, *,
         kv_head_copies: bool = True,
         adapter: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None
         ) -> LoadedModel:
  """Loads any supported checkpoint (float32 params, or its quantized weights) onto the
  default device, or split over `mesh` (a Mesh or a spec such as "tensor=4" or
  "data=2,tensor=4", `jaxllm.parallel.placement`): heads, MLP and vocabulary over `tensor`,
  KV heads repeated where the tensor axis does not divide them (`kv_head_copies=False` keeps
  the model's own, for tools that write it back). `adapter`: a LoRA adapter directory in
  PEFT's format (`jaxllm.lora.peft_format`), applied unmerged (on a mesh, its `a` and `b` split
  like their weight, `placement.lora_axes`); a sequence of them: a bank (`jaxllm.lora.bank`)
  for an engine whose requests pick adapter slot i + 1 (slot 0: the base)."""
  if isinstance(mesh, str):
    mesh = placement.parse_mesh(mesh)
  ckpt = convert.read_checkpoint(path, mesh=mesh)
  if mesh is None:
    params, cfg = jax.tree.map(jnp.asarray, ckpt.params), ckpt.model
  else:
    params, cfg = placement.place_params(ckpt.params, ckpt.model, mesh,
                                         transformer.logical_axes(ckpt.model),
                                         kv_head_copies=kv_head_copies)
  if adapter is not None:
    from jaxllm.lora import peft_format
    if cfg.n_kv_heads != ckpt.model.n_kv_heads:
      raise peft_format.AdapterError(
          f"an adapter on this mesh: its tensor axis does not divide the model's "
          f"{ckpt.model.n_kv_heads} KV heads (they are repeated to {cfg.n_kv_heads}); use a "
          "tensor axis that divides them, or merge the adapter into the checkpoint first")
    if isinstance(adapter, (str, os.PathLike)):
      params = peft_format.load(os.fspath(adapter), params, cfg)
    else:
      from jaxllm.lora import bank
      params = bank.load(adapter, params, cfg)
    if mesh is not None:
      params = jax.device_put(params, placement.qtensor_shardings(
          params, transformer.logical_axes(cfg), mesh))
  graphdef, _ = transformer.abstract_params(cfg)
  return LoadedModel(cfg, graphdef, params, ckpt.tokenizer, ckpt.kind, mesh)
