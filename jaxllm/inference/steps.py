"""The engine's device steps: pure jitted functions over the paged pools, fixed shapes.

  `prefill_chunk`        one chunk of one request's prompt into its pages -> its last logits;
  `decode`               draw a token for every slot from its logits (per-request sampling),
                         feed it, keep the new logits; empty slots store nothing;
  `decode_speculative`   the same with up to k proposals per slot verified in the pass;
  `mixed`                `decode` with prompt tokens of requests being prefilled in the same
                         pass (a ragged step: long prompts no longer hold up running streams).
Both take an optional `bias_BV` (requests' logit_bias, added before the draw) and `mask_BW` (a
grammar's allowed tokens per slot, `jaxllm.inference.grammar`) that the draw respects; None
compiles the step without.
The pools (`k`, `v`) are donated: each step updates them in place. Scheduling is the host's
(`jaxllm.inference.engine`). Params holding LoRA banks (`jaxllm.lora.bank`) take each row's
adapter slot (`adapter_1`, `adapters_B`) and pick its adapter inside the step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.inference import generate as gen
from jaxllm.inference import sampling, speculative
from jaxllm.lora import bank as lora_bank
from jaxllm.model import cache as kv_cache


def _adjusted(logits_BV, arrays, counts_BV, prompt_mask_BV, bias_BV, mask_BW, penalties: bool):
  """The logits a slot draws from: penalties, then the logit bias, then the grammar's mask
  (each only where given)."""
  if penalties:
    logits_BV = sampling.apply_penalties(logits_BV, arrays, counts_BV, prompt_mask_BV)
  if bias_BV is not None:
    logits_BV = logits_BV + bias_BV
  if mask_BW is not None:
    logits_BV = sampling.apply_token_mask(logits_BV, mask_BW)
  return logits_BV


@functools.partial(jax.jit, static_argnames=("graphdef", "stream"), donate_argnames=("k", "v"))
def prefill_chunk(graphdef, params, k, v, page_rows_RM, lengths_R, tokens_RC, num_new_R,
                  adapters_R=None, *, stream: kv_cache.Stream | None = None):
  """R requests' next chunks (`tokens_RC`, the first `num_new_R` of each row real; a row with
  0 writes nothing) into the page pool: (the logits after each row's last new token `[R, V]`,
  k, v)."""
  gen.count_trace("engine_prefill")
  cache = kv_cache.PagedKVCache(k, v, page_rows_RM, lengths_R)
  model = nnx.merge(graphdef, lora_bank.select(params, adapters_R))
  logits, cache = model.extend(tokens_RC, cache, num_new_R, last_only=True, stream=stream)
  return logits[:, 0], cache.k, cache.v


@functools.partial(jax.jit, static_argnames=("graphdef", "penalties", "stream"),
                   donate_argnames=("k", "v", "logits_BV", "counts_BV"))
def decode(graphdef, params, k, v, page_table_BM, lengths_B, active_B, logits_BV, arrays,
            steps_B, counts_BV, prompt_mask_BV, adapters_B=None, bias_BV=None, mask_BW=None,
            *, penalties: bool, stream: kv_cache.Stream | None = None):
  """`stream`: every row is a StreamingLLM sequence whose M pages hold its sinks and ring.
  `adapters_B`: each row's adapter slot where `params` hold a bank (`jaxllm.lora.bank`).
  `bias_BV`: each row's logit_bias, or None; `mask_BW`: the tokens each row may draw (a
  grammar's bitmask), or None for any."""
  gen.count_trace("engine_decode")
  V = logits_BV.shape[-1]
  processed = _adjusted(logits_BV, arrays, counts_BV, prompt_mask_BV, bias_BV, mask_BW,
                        penalties)
  tok_B = sampling.draw(processed, arrays, sampling.row_keys(arrays, steps_B))
  logp_B = sampling.token_logprobs(logits_BV, tok_B)
  if penalties:
    counts_BV = counts_BV + jax.nn.one_hot(tok_B, V, dtype=jnp.int32) * active_B[:, None]
  cache = kv_cache.PagedKVCache(k, v, page_table_BM, lengths_B)
  model = nnx.merge(graphdef, lora_bank.select(params, adapters_B))
  new_B1V, cache = model.extend(tok_B[:, None], cache, active_B.astype(jnp.int32), stream=stream)
  logits_BV = jnp.where(active_B[:, None], new_B1V[:, 0], logits_BV)
  return tok_B, logp_B, logits_BV, counts_BV, cache.k, cache.v


@functools.partial(jax.jit, static_argnames=("graphdef", "penalties"),
                   donate_argnames=("k", "v", "logits_BV", "counts_BV"))
def mixed(graphdef, params, k, v, page_table_NM, lengths_N, active_N, logits_BV, arrays,
          steps_B, counts_BV, prompt_mask_BV, prompt_tokens_P, ends_P, adapters_N=None,
          bias_BV=None, mask_BW=None, *, penalties: bool):
  """`decode` and prompt tokens in one pass of N = B + P single-token rows (a ragged step).

  Rows 0..B-1 are the slots, as in `decode`: each active one draws a token from its logits and
  feeds it. Rows B.. feed `prompt_tokens_P`, tokens of prompts being prefilled, each at its own
  position (`lengths_N`) under its request's page table: a prompt's consecutive tokens sit in
  consecutive rows, and since every row's key and value are written into the pages before any
  row of the layer reads them, each sees its earlier tokens of the same step. `ends_P`: the
  slot whose prompt row p completes (its logits become that slot's), B where none.
  Inactive rows store nothing."""
  gen.count_trace("engine_mixed")
  B, V = logits_BV.shape
  processed = _adjusted(logits_BV, arrays, counts_BV, prompt_mask_BV, bias_BV, mask_BW,
                        penalties)
  tok_B = sampling.draw(processed, arrays, sampling.row_keys(arrays, steps_B))
  logp_B = sampling.token_logprobs(logits_BV, tok_B)
  if penalties:
    counts_BV = counts_BV + jax.nn.one_hot(tok_B, V, dtype=jnp.int32) * active_N[:B, None]
  tokens_N = jnp.concatenate([tok_B, prompt_tokens_P])
  cache = kv_cache.PagedKVCache(k, v, page_table_NM, lengths_N)
  model = nnx.merge(graphdef, lora_bank.select(params, adapters_N))
  new_N1V, cache = model.extend(tokens_N[:, None], cache, active_N.astype(jnp.int32))
  new_NV = new_N1V[:, 0]
  logits_BV = jnp.where(active_N[:B, None], new_NV[:B], logits_BV)
  logits_BV = logits_BV.at[ends_P].set(new_NV[B:], mode="drop")
  return tok_B, logp_B, logits_BV, counts_BV, cache.k, cache.v


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "k", "max_ngram",
                                             "penalties"),
                   donate_argnames=("k_pages", "v_pages", "dk_pages", "dv_pages", "logits_BV",
                                    "sub_BV", "counts_BV"))
def decode_speculative(graphdef, params, k_pages, v_pages, draft_graphdef, draft_params,
                        dk_pages, dv_pages, page_table_BM, lengths_B, active_B, logits_BV, arrays,
                        steps_B, sub_BV, hist_BH, drafts_B, counts_BV, prompt_mask_BV,
                        adapters_B=None, bias_BV=None, mask_BW=None, *, k: int,
                        max_ngram: int, penalties: bool):
  """One step that emits 1 to 1 + drafts_B[b] tokens per slot.

  The slot's logits give t0, drawn from the target's distribution p, or from norm(max(p - s, 0))
  where the previous step rejected a proposal drawn from s (`sub_BV`, zero rows otherwise).
  The draft proposes d_1..d_k from distributions q_i: prompt lookup over the history (one-hot
  q) or a draft model with its own paged cache under the same page table (it feeds t0 and
  the proposals). The target scores [t0, d_1..d_k] in one pass and d_i is accepted while
  u_i q_i(d_i) < p_{i-1}(d_i). That keeps the target's distribution, and greedy rows (one-hot
  p and q) accept exactly the argmax. The new slot logits are those after the last accepted
  token; the first rejection's q becomes the next step's `sub_BV`. Rows with penalties draft
  nothing (drafts_B = 0): their counts change by t0 alone. A draft holding the target's LoRA
  banks (`layer_skip`) proposes with each row's adapter (`adapters_B`). Rows with a logit bias
  (`bias_BV`) or under a grammar (`mask_BW`) draw t0 with it and draft nothing.
  """
  gen.count_trace("engine_decode_speculative")
  B, V = logits_BV.shape
  rows_B = jnp.arange(B)
  keys_B2 = sampling.row_keys(arrays, steps_B)
  processed_BV = _adjusted(logits_BV, arrays, counts_BV, prompt_mask_BV, bias_BV, mask_BW,
                           penalties)
  resid_BV = speculative.residual(sampling.probabilities(processed_BV, arrays), sub_BV)
  t0_B = jnp.where(jnp.sum(sub_BV, -1) > 0, speculative.sample_from(resid_BV, keys_B2),
                   sampling.draw(processed_BV, arrays, keys_B2))
  if penalties:
    counts_BV = counts_BV + jax.nn.one_hot(t0_B, V, dtype=jnp.int32) * active_B[:, None]
  if draft_graphdef is None:
    hist_BH = hist_BH.at[rows_B, lengths_B].set(t0_B, mode="drop")
    d_Bk = speculative.ngram_proposals(hist_BH, lengths_B + 1, t0_B, k=k, max_ngram=max_ngram)
    q_BkV = jax.nn.one_hot(d_Bk, V, dtype=jnp.float32)
  else:
    draft = nnx.merge(draft_graphdef, lora_bank.select(draft_params, adapters_B))

    def draft_step(carry, i):
      dcache, tok_B = carry
      # Feeds position lengths + i; within the pages the row holds while i <= drafts_B.
      fed_B = (active_B & (i <= drafts_B)).astype(jnp.int32)
      out_B1V, dcache = draft.extend(tok_B[:, None], dcache, fed_B)
      q_BV = sampling.probabilities(out_B1V[:, 0], arrays)
      d_B = speculative.sample_from(
          q_BV, jax.vmap(lambda key: jax.random.fold_in(key, 2 + i))(keys_B2))
      return (dcache, d_B), (d_B, q_BV)

    # k + 1 feeds (t0, d_1..d_k): the last only writes d_k's entry, so the draft cache holds
    # every token the target may keep, and its proposal is unused.
    dcache = kv_cache.PagedKVCache(dk_pages, dv_pages, page_table_BM, lengths_B)
    (dcache, _), (d_TB, q_TBV) = jax.lax.scan(draft_step, (dcache, t0_B), jnp.arange(k + 1))
    dk_pages, dv_pages = dcache.k, dcache.v
    d_Bk, q_BkV = jnp.moveaxis(d_TB[:k], 0, 1), jnp.moveaxis(q_TBV[:k], 0, 1)
  cache = kv_cache.PagedKVCache(k_pages, v_pages, page_table_BM, lengths_B)
  tokens_BT = jnp.concatenate([t0_B[:, None], d_Bk], axis=1)
  fed_B = (1 + drafts_B) * active_B.astype(jnp.int32)
  logits_BTV, cache = nnx.merge(graphdef, lora_bank.select(params, adapters_B)).extend(
      tokens_BT, cache, fed_B)
  p_BTV = speculative.target_probabilities(logits_BTV, arrays)
  u_Bk = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (k,)))(keys_B2)
  n_acc_B = speculative.accepted_prefix(p_BTV, q_BkV, d_Bk, u_Bk, drafts_B)
  logp_BT = jnp.concatenate([
      sampling.token_logprobs(logits_BV, t0_B)[:, None],
      jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :k], axis=-1), d_Bk[..., None],
                          axis=-1)[..., 0]], axis=1)
  new_BV = jnp.take_along_axis(logits_BTV, n_acc_B[:, None, None], axis=1)[:, 0]
  logits_BV = jnp.where(active_B[:, None], new_BV, logits_BV)
  q_rej_BV = jnp.take_along_axis(q_BkV, jnp.minimum(n_acc_B, k - 1)[:, None, None], axis=1)[:, 0]
  sub_BV = jnp.where((active_B & (n_acc_B < drafts_B))[:, None], q_rej_BV, 0.0)
  return (tokens_BT, logp_BT, n_acc_B, logits_BV, sub_BV, counts_BV, cache.k, cache.v,
          dk_pages, dv_pages)
