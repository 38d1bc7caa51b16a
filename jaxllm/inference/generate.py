"""KV-cached generation: one jitted prefill + `lax.while_loop` decode per call.

Prompts are right-padded to a power-of-two bucket and the cache is sized to bucket + max_tokens,
so a handful of compiled shapes serve all prompt lengths.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.inference import kv_cache, sampling


def _bucket(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << (n - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "max_tokens", "top_k", "eos_id",
                                             "cache_dtype"))
def _generate(graphdef, params, tokens_BP, lengths_B, key, temperature, top_p, *,
              max_tokens: int, top_k: int, eos_id: int, cache_dtype):
  model = nnx.merge(graphdef, params)
  cfg = model.cfg
  B, P = tokens_BP.shape
  cache = kv_cache.init_cache(cfg.n_layers, B, P + max_tokens, cfg.n_kv_heads, cfg.head_dim,
                              cache_dtype)
  logits_BPV, cache = model.extend(tokens_BP, cache, lengths_B)
  last_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]

  def cond(carry):
    i, _, _, _, _, done_B = carry
    return (i < max_tokens) & ~jnp.all(done_B)

  def body(carry):
    i, cache, last_BV, key, out_BN, done_B = carry
    key, sub = jax.random.split(key)
    tok_B = sampling.sample(last_BV, sub, temperature=temperature, top_k=top_k, top_p=top_p)
    tok_B = jnp.where(done_B, eos_id, tok_B)
    out_BN = out_BN.at[:, i].set(tok_B)
    done_B = done_B | (tok_B == eos_id)
    logits_B1V, cache = model.extend(tok_B[:, None], cache)
    return i + 1, cache, logits_B1V[:, 0], key, out_BN, done_B

  out_BN = jnp.full((B, max_tokens), eos_id, jnp.int32)
  init = (jnp.int32(0), cache, last_BV, key, out_BN, jnp.zeros((B,), bool))
  return jax.lax.while_loop(cond, body, init)[4]


def generate(graphdef, params, prompts: Sequence[Sequence[int]], *, max_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int = -1, max_seq_len: int | None = None,
             cache_dtype=jnp.float32) -> list[list[int]]:
  """Continues each prompt by up to `max_tokens` tokens (stopping at `eos_id`, not included)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  if max_tokens <= 0:
    raise ValueError(f"max_tokens={max_tokens} must be positive")
  longest = max(len(p) for p in prompts)
  if max_seq_len is not None and longest + max_tokens > max_seq_len:
    raise ValueError(f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds the "
                     f"model's max_seq_len {max_seq_len}")
  P = _bucket(longest)
  tokens = np.zeros((len(prompts), P), np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  out = _generate(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths),
                  jax.random.PRNGKey(seed), jnp.float32(temperature), jnp.float32(top_p),
                  max_tokens=max_tokens, top_k=top_k, eos_id=eos_id, cache_dtype=cache_dtype)
  results = []
  for row in np.asarray(out).tolist():
    results.append(row[:row.index(eos_id)] if eos_id in row else row)
  return results
