"""`jaxllm.load(path)`: a trained model, ready for logits and generation.

Today `path` is a training workdir (config.json, tokenizer.model, checkpoints/) or one of its
checkpoint step directories (`<workdir>/checkpoints/<step>`).
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

from jaxllm import config as config_lib
from jaxllm.checkpoint.orbax import CheckpointError, Checkpointer
from jaxllm.data.tokenizer import SentencePieceTokenizer, Tokenizer
from jaxllm.inference import generate as generate_lib
from jaxllm.model import transformer
from jaxllm.train import workdir as workdir_lib


@dataclasses.dataclass
class LoadedModel:
  config: config_lib.Config
  graphdef: Any
  params: Any
  tokenizer: Tokenizer

  def logits(self, ids) -> jax.Array:
    """float32 `[B, T, V]` logits of a full forward pass over int ids `[B, T]`."""
    return _forward(self.graphdef, self.params, jnp.asarray(ids, jnp.int32))

  def generate(self, prompt: str | Sequence[int] | Sequence[Sequence[int]], *,
               max_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
    """Continues a text prompt (returns text), or token prompts (returns lists of ids)."""
    if isinstance(prompt, str):
      ids = [self.tokenizer.bos_id, *self.tokenizer.encode(prompt)]
      out = self.generate([ids], max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, seed=seed)[0]
      return self.tokenizer.decode(out)
    prompts = [list(prompt)] if prompt and np.ndim(prompt[0]) == 0 else [list(p) for p in prompt]
    return generate_lib.generate(
        self.graphdef, self.params, prompts, max_tokens=max_tokens, temperature=temperature,
        top_k=top_k, top_p=top_p, seed=seed, eos_id=self.tokenizer.eos_id,
        max_seq_len=self.config.model.max_seq_len)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, ids_BT):
  return nnx.merge(graphdef, params)(ids_BT)


def _split_workdir_and_step(path: str) -> tuple[str, int | None]:
  path = os.path.abspath(path)
  base = os.path.basename(path)
  parent = os.path.dirname(path)
  if base.isdigit() and os.path.basename(parent) == workdir_lib.CHECKPOINT_DIR:
    return os.path.dirname(parent), int(base)
  return path, None


def load(path: str | os.PathLike[str]) -> LoadedModel:
  """Loads a training workdir (or one of its checkpoint steps) onto the default device."""
  workdir, step = _split_workdir_and_step(os.fspath(path))
  if not os.path.exists(workdir):
    raise FileNotFoundError(f"no such checkpoint: {path}")
  config_path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{path} is not a jaxllm workdir (no {workdir_lib.CONFIG_FILE}); "
                          "Hugging Face and GGUF checkpoints are not supported yet")
  cfg = workdir_lib.read_config(workdir)
  tokenizer = SentencePieceTokenizer(os.path.join(workdir, workdir_lib.TOKENIZER_FILE))
  graphdef, abstract = transformer.abstract_params(cfg.model)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract)
  checkpointer = Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR), read_only=True)
  try:
    params = checkpointer.restore_params(abstract, step=step)
  finally:
    checkpointer.close()
  return LoadedModel(cfg, graphdef, params, tokenizer)
