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

from jaxllm.checkpoint import convert
from jaxllm.config import ModelConfig
from jaxllm.data import chat as chat_lib
from jaxllm.inference import generate as generate_lib
from jaxllm.model import transformer


@dataclasses.dataclass
class LoadedModel:
  config: ModelConfig
  graphdef: Any
  params: Any
  tokenizer: Any
  kind: str

  def logits(self, ids) -> jax.Array:
    """float32 `[B, T, V]` logits of a full forward pass over int ids `[B, T]`."""
    return _forward(self.graphdef, self.params, jnp.asarray(ids, jnp.int32))

  def prompt_ids(self, text: str) -> list[int]:
    """Token ids of a raw-text prompt, with BOS first where the model expects one."""
    ids = self.tokenizer.encode(text)
    bos = self.tokenizer.bos_id
    return ([bos] if self.tokenizer.add_bos and bos >= 0 else []) + ids

  def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template."""
    template = self.tokenizer.chat_template
    if not template:
      raise ValueError("this model has no chat template; use a prompt instead")
    return self.tokenizer.encode(chat_lib.render(template, messages, self.tokenizer))

  def generate(self, prompt: str | Sequence[int] | Sequence[Sequence[int]], *,
               max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
    """Continues a text prompt (returns text), or token prompts (returns lists of ids)."""
    if isinstance(prompt, str):
      out = self.generate([self.prompt_ids(prompt)], max_tokens=max_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)[0]
      return self.tokenizer.decode(out)
    prompts = [list(prompt)] if prompt and np.ndim(prompt[0]) == 0 else [list(p) for p in prompt]
    return generate_lib.generate(
        self.graphdef, self.params, prompts, max_tokens=max_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_id=self.tokenizer.eos_id,
        max_seq_len=self.config.max_seq_len)

  def chat(self, message: str, **kwargs) -> str:
    """The model's reply to one user message (chat template applied)."""
    ids = self.chat_ids([{"role": "user", "content": message}])
    return self.tokenizer.decode(self.generate([ids], **kwargs)[0])


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids_BT):
  return nnx.merge(graphdef, params)(ids_BT)


def load(path: str | os.PathLike[str]) -> LoadedModel:
  """Loads any supported checkpoint onto the default device (float32 params)."""
  ckpt = convert.read_checkpoint(path)
  graphdef, _ = transformer.abstract_params(ckpt.model)
  params = jax.tree.map(jnp.asarray, ckpt.params)
  return LoadedModel(ckpt.model, graphdef, params, ckpt.tokenizer, ckpt.kind)
