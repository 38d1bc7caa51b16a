"""Offline generation as a device loop over the engine's own steps.

`decode_loop` runs `steps.draw_and_feed` and `speculative_loop` runs
`steps.speculate_and_verify` (the functions every engine step runs) inside one jitted
`lax.while_loop` each, so a batch of prompts decodes without a host round trip per token:
the stop tokens, max_tokens and the output buffer are kept on the device, and the loop exits
when every row is done. Both take any KV cache (contiguous or paged), already holding each
prompt, and the logits after its last token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from jaxllm.inference import steps
from jaxllm.inference.traces import count_trace
from jaxllm.model import cache as kv_cache


def _start(B: int, out_len: int) -> dict:
  """The output side of a loop's carry: `out`/`logp` `[B, out_len]`, per row the tokens
  emitted `n`, `done`, and `reason` (0 running, 1 stop, 2 length)."""
  return dict(out=jnp.zeros((B, out_len), jnp.int32), logp=jnp.zeros((B, out_len), jnp.float32),
              n=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool),
              reason=jnp.zeros((B,), jnp.int32))


def _commit(c: dict, tokens_BT, logp_BT, count_B, active_B, stop_ids_BX, max_new_B,
            out_len: int) -> dict:
  """Writes each active row's first count_B tokens into the output, cut before the first stop
  token (which ends the row, not written) and at max_new_B tokens (which ends it too)."""
  B, T = tokens_BT.shape
  j_T = jnp.arange(T)[None, :]
  stop_BT = (jnp.any(tokens_BT[..., None] == stop_ids_BX[:, None, :], axis=-1)
             & (j_T < count_B[:, None]))
  stop_at_B = jnp.min(jnp.where(stop_BT, j_T, T), axis=1)
  room_B = max_new_B - c["n"]
  stopped_B = active_B & (stop_at_B < count_B) & (stop_at_B < room_B)
  emit_B = jnp.where(active_B, jnp.where(stopped_B, stop_at_B, jnp.minimum(count_B, room_B)), 0)
  slot_BT = jnp.where(j_T < emit_B[:, None], c["n"][:, None] + j_T, out_len)  # else dropped
  rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], slot_BT.shape)
  n_B = c["n"] + emit_B
  length_B = active_B & ~stopped_B & (n_B >= max_new_B)
  return dict(out=c["out"].at[rows_BT, slot_BT].set(tokens_BT, mode="drop"),
              logp=c["logp"].at[rows_BT, slot_BT].set(logp_BT, mode="drop"), n=n_B,
              done=c["done"] | stopped_B | length_B,
              reason=jnp.where(stopped_B, 1, jnp.where(length_B, 2, c["reason"])))


@functools.partial(jax.jit, static_argnames=("graphdef", "out_len", "penalties", "stream",
                                             "on_tokens"))
def decode_loop(graphdef, params, cache, logits_BV, arrays, max_new_B, stop_ids_BX,
                prompt_mask_BV, *, out_len: int, penalties: bool, stream=None, on_tokens=None):
  """Up to out_len tokens per row -> (tokens `[B, out_len]`, logprobs, count `[B]`, reason `[B]`).
  `on_tokens(tokens, counts)` (a hashable host function) hears after every step."""
  count_trace("decode_loop")
  model = nnx.merge(graphdef, params)
  B, V = logits_BV.shape

  def cond(c):
    return (c["i"] < out_len) & ~jnp.all(c["done"])

  def body(c):
    active_B = ~c["done"]
    batch = steps.Batch(None, None, active_B, c["n"], arrays, prompt_mask_BV)
    tok_B, logp_B, logits, counts, cache = steps.draw_and_feed(
        model, c["cache"], c["logits"], c["counts"], batch, penalties=penalties, stream=stream)
    new = _commit(c, tok_B[:, None], logp_B[:, None], jnp.ones_like(c["n"]), active_B,
                  stop_ids_BX, max_new_B, out_len)
    if on_tokens is not None:
      io_callback(on_tokens, None, new["out"], new["n"], ordered=True)
    return dict(c, **new, i=c["i"] + 1, cache=cache, logits=logits, counts=counts)

  init = dict(_start(B, out_len), i=jnp.int32(0), cache=cache, logits=logits_BV,
              counts=jnp.zeros((B, V) if penalties else (1, 1), jnp.int32))
  final = jax.lax.while_loop(cond, body, init)
  return final["out"], final["logp"], final["n"], final["reason"]


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "k", "out_len",
                                             "max_ngram", "on_tokens"))
def speculative_loop(graphdef, params, draft_graphdef, draft_params, cache, draft_cache,
                     logits_BV, hist_BH, arrays, max_new_B, stop_ids_BX, *, k: int, out_len: int,
                     max_ngram: int, on_tokens=None):
  """Up to out_len tokens per row, each iteration one `steps.speculate_and_verify` (k
  proposals per row) -> (tokens, logprobs, count, reason as `decode_loop`; iterations,
  proposed `[B]`, accepted `[B]`). `draft_graphdef` None: prompt lookup over `hist_BH` (each
  prompt, room for every token to come); else a model draft whose `draft_cache` holds the
  prompts as `cache` does. Both caches need room for out_len + k + 1 tokens past the prompt."""
  count_trace("speculative_loop")
  target = nnx.merge(graphdef, params)
  draft = None if draft_graphdef is None else nnx.merge(draft_graphdef, draft_params)
  B, V = logits_BV.shape

  def cond(c):
    return (c["it"] < out_len) & ~jnp.all(c["done"])

  def body(c):
    active_B = ~c["done"]
    lengths_B = c["cache"].lengths
    # No proposal past max_tokens: it could only be thrown away.
    drafts_B = jnp.where(active_B, jnp.clip(max_new_B - c["n"] - 1, 0, k), 0)
    batch = steps.Batch(None, None, active_B, c["n"], arrays, jnp.zeros((1, 1), bool))
    v = steps.speculate_and_verify(target, draft, c["cache"], c["draft_cache"], c["logits"],
                                   jnp.zeros((1, 1), jnp.int32), c["sub"], batch, c["hist"],
                                   drafts_B, k=k, max_ngram=max_ngram, penalties=False)
    new = _commit(c, v.tokens_BT, v.logp_BT, v.emitted_B, active_B, stop_ids_BX, max_new_B,
                  out_len)
    if on_tokens is not None:
      io_callback(on_tokens, None, new["out"], new["n"], ordered=True)
    # Both caches keep t0 and the accepted proposals, as does the history.
    kept_B = v.emitted_B
    j_T = jnp.arange(k + 1)[None, :]
    slot_BT = jnp.where(j_T < kept_B[:, None], lengths_B[:, None] + j_T, c["hist"].shape[1])
    rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], slot_BT.shape)
    return dict(
        c, **new, it=c["it"] + 1, logits=v.logits_BV, sub=v.sub_BV,
        cache=kv_cache.with_lengths(v.cache, lengths_B + kept_B),
        draft_cache=(None if draft is None
                     else kv_cache.with_lengths(v.draft_cache, lengths_B + kept_B)),
        hist=c["hist"].at[rows_BT, slot_BT].set(v.tokens_BT, mode="drop"),
        proposed=c["proposed"] + drafts_B, accepted=c["accepted"] + v.accepted_B * active_B)

  init = dict(_start(B, out_len), it=jnp.int32(0), cache=cache, draft_cache=draft_cache,
              logits=logits_BV, sub=jnp.zeros((B, V), jnp.float32), hist=hist_BH,
              proposed=jnp.zeros((B,), jnp.int32), accepted=jnp.zeros((B,), jnp.int32))
  final = jax.lax.while_loop(cond, body, init)
  return (final["out"], final["logp"], final["n"], final["reason"], final["it"],
          final["proposed"], final["accepted"])
