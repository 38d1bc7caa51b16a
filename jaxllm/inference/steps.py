"""The engine's device steps: pure jitted functions over the paged pools, fixed shapes.

  `prefill_chunk`        one chunk of R requests' prompts into their pages -> their last logits;
  `decode`               draw a token for every slot from its logits (per-request sampling),
                         feed it, keep the new logits; empty slots store nothing;
  `decode_speculative`   the same with up to k proposals per slot verified in the pass;
  `mixed`                `decode` with prompt tokens of requests being prefilled in the same
                         pass (a ragged step: long prompts no longer hold up running streams).
Every step takes the engine's device state (`DecodeState`: page pools, slot logits, counts) as
one pytree, donated (updated in place), and returns it; what the host's scheduling decided for
the step comes as a `Batch`. A batch's optional `bias_BV` (requests' logit_bias, added before
the draw) and `mask_BW` (a grammar's allowed tokens per slot, `jaxllm.inference.grammar`) are
respected by the draw; None compiles the step without. Params holding LoRA banks
(`jaxllm.lora.bank`) take each row's adapter slot and pick its adapter inside the step.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.inference import acceptance, sampling
from jaxllm.inference.traces import count_trace
from jaxllm.lora import bank as lora_bank
from jaxllm.model import cache as kv_cache


class DecodeState(NamedTuple):
  """The engine's device arrays: `k`, `v` its page pools (`[L, N, P, K, Dh]`, or int8 pages
  with scales); per slot, `logits_BV` the logits its next draw reads, `counts_BV` its generated
  tokens' counts (penalties) and `sub_BV` the draft distribution of the proposal the last
  speculative step rejected (zero rows: nothing owed); `dk`, `dv` a model draft's pools (None
  without one)."""
  k: Any
  v: Any
  logits_BV: jax.Array
  counts_BV: jax.Array
  sub_BV: jax.Array
  dk: Any = None
  dv: Any = None


class Batch(NamedTuple):
  """One step's rows as the host scheduled them: page table `[B, M]`, lengths (tokens in the
  cache) and active flags `[B]`, each slot's draw count `steps_B` (its sampling key's step),
  `arrays` (`sampling.SamplingArrays`), the prompt tokens of each slot `[B, V]` (penalties),
  and optionally each row's adapter slot, logit bias `[B, V]` and grammar mask `[B, W]`."""
  page_table_BM: jax.Array
  lengths_B: jax.Array
  active_B: jax.Array
  steps_B: jax.Array
  arrays: Any
  prompt_mask_BV: jax.Array
  adapters_B: jax.Array | None = None
  bias_BV: jax.Array | None = None
  mask_BW: jax.Array | None = None


def _adjusted_logits(logits_BV, counts_BV, batch: Batch, penalties: bool):
  """The logits a slot draws from: penalties, then the logit bias, then the grammar's mask
  (each only where given)."""
  if penalties:
    logits_BV = sampling.apply_penalties(logits_BV, batch.arrays, counts_BV,
                                         batch.prompt_mask_BV)
  if batch.bias_BV is not None:
    logits_BV = logits_BV + batch.bias_BV
  if batch.mask_BW is not None:
    logits_BV = sampling.apply_token_mask(logits_BV, batch.mask_BW)
  return logits_BV


def _draw_and_count(logits_BV, counts_BV, batch: Batch, penalties: bool, active_B):
  """(token drawn for each slot, its logprob under the model, the counts with it)."""
  V = logits_BV.shape[-1]
  processed = _adjusted_logits(logits_BV, counts_BV, batch, penalties)
  tok_B = sampling.draw(processed, batch.arrays, sampling.row_keys(batch.arrays, batch.steps_B))
  logp_B = sampling.token_logprobs(logits_BV, tok_B)
  if penalties:
    counts_BV = counts_BV + jax.nn.one_hot(tok_B, V, dtype=jnp.int32) * active_B[:, None]
  return tok_B, logp_B, counts_BV


def draw_and_feed(model, cache, logits_BV, counts_BV, batch: Batch, *, penalties: bool,
                  stream: kv_cache.Stream | None = None):
  """The decode step on any KV cache (the engine's pages, or an offline loop's contiguous or
  paged cache): each active row draws a token from its logits and feeds it; inactive rows
  store nothing and keep their logits. -> (token `[B]`, its logprob `[B]`, logits `[B, V]`,
  counts `[B, V]`, cache). The batch's page table and lengths are not read (the cache has
  them)."""
  active_B = batch.active_B
  tok_B, logp_B, counts_BV = _draw_and_count(logits_BV, counts_BV, batch, penalties, active_B)
  new_B1V, cache = model.extend(tok_B[:, None], cache, active_B.astype(jnp.int32),
                                stream=stream)
  logits_BV = jnp.where(active_B[:, None], new_B1V[:, 0], logits_BV)
  return tok_B, logp_B, logits_BV, counts_BV, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "stream"),
                   donate_argnames=("state",))
def prefill_chunk(graphdef, params, state: DecodeState, page_rows_RM, lengths_R, tokens_RC,
                  num_new_R, adapters_R=None, draft_graphdef=None, draft_params=None,
                  draft_adapters_R=None, *, stream: kv_cache.Stream | None = None):
  """R requests' next chunks (`tokens_RC`, the first `num_new_R` of each row real; a row with
  0 writes nothing) into the page pools, the draft's too where there is one (its pool holds
  the same tokens under the same page table): (the logits after each row's last new token
  `[R, V]`, state)."""
  count_trace("engine_prefill")
  cache = kv_cache.PagedKVCache(state.k, state.v, page_rows_RM, lengths_R)
  model = nnx.merge(graphdef, lora_bank.select(params, adapters_R))
  logits, cache = model.extend(tokens_RC, cache, num_new_R, last_only=True, stream=stream)
  state = state._replace(k=cache.k, v=cache.v)
  if draft_graphdef is not None:
    dcache = kv_cache.PagedKVCache(state.dk, state.dv, page_rows_RM, lengths_R)
    draft = nnx.merge(draft_graphdef, lora_bank.select(draft_params, draft_adapters_R))
    _, dcache = draft.extend(tokens_RC, dcache, num_new_R, last_only=True)
    state = state._replace(dk=dcache.k, dv=dcache.v)
  return logits[:, 0], state


@functools.partial(jax.jit, static_argnames=("graphdef", "penalties", "stream"),
                   donate_argnames=("state",))
def decode(graphdef, params, state: DecodeState, batch: Batch, *, penalties: bool,
           stream: kv_cache.Stream | None = None):
  """(token `[B]`, its logprob `[B]`, state). `stream`: every row is a StreamingLLM sequence
  whose M pages hold its sinks and ring."""
  count_trace("engine_decode")
  cache = kv_cache.PagedKVCache(state.k, state.v, batch.page_table_BM, batch.lengths_B)
  model = nnx.merge(graphdef, lora_bank.select(params, batch.adapters_B))
  tok_B, logp_B, logits_BV, counts_BV, cache = draw_and_feed(
      model, cache, state.logits_BV, state.counts_BV, batch, penalties=penalties, stream=stream)
  return tok_B, logp_B, state._replace(k=cache.k, v=cache.v, logits_BV=logits_BV,
                                       counts_BV=counts_BV)


@functools.partial(jax.jit, static_argnames=("graphdef", "penalties"),
                   donate_argnames=("state",))
def mixed(graphdef, params, state: DecodeState, batch: Batch, prompt_tokens_P, ends_P, *,
          penalties: bool):
  """`decode` and prompt tokens in one pass of N = B + P single-token rows (a ragged step):
  (token `[B]`, its logprob `[B]`, state).

  The batch's page table, lengths, active flags and adapters have N rows; the rest B. Rows
  0..B-1 are the slots, as in `decode`: each active one draws a token from its logits and
  feeds it. Rows B.. feed `prompt_tokens_P`, tokens of prompts being prefilled, each at its own
  position under its request's page table: a prompt's consecutive tokens sit in consecutive
  rows, and since every row's key and value are written into the pages before any row of the
  layer reads them, each sees its earlier tokens of the same step. `ends_P`: the slot whose
  prompt row p completes (its logits become that slot's), B where none. Inactive rows store
  nothing."""
  count_trace("engine_mixed")
  B = state.logits_BV.shape[0]
  active_N = batch.active_B
  tok_B, logp_B, counts_BV = _draw_and_count(state.logits_BV, state.counts_BV, batch, penalties,
                                             active_N[:B])
  tokens_N = jnp.concatenate([tok_B, prompt_tokens_P])
  cache = kv_cache.PagedKVCache(state.k, state.v, batch.page_table_BM, batch.lengths_B)
  model = nnx.merge(graphdef, lora_bank.select(params, batch.adapters_B))
  new_N1V, cache = model.extend(tokens_N[:, None], cache, active_N.astype(jnp.int32))
  new_NV = new_N1V[:, 0]
  logits_BV = jnp.where(active_N[:B, None], new_NV[:B], state.logits_BV)
  logits_BV = logits_BV.at[ends_P].set(new_NV[B:], mode="drop")
  return tok_B, logp_B, state._replace(k=cache.k, v=cache.v, logits_BV=logits_BV,
                                       counts_BV=counts_BV)


class Given(NamedTuple):
  """Proposals the host made and checked against a row's grammar (`rows_B`): `tokens_BT`
  `[B, 1 + k]` proposes the row's next tokens from its very next draw on (the first
  drafts_B[b] real), and `masks_BTW` holds the grammar's bitmask before each of them (-1 rows
  elsewhere)."""
  rows_B: jax.Array
  tokens_BT: jax.Array
  masks_BTW: jax.Array


class Verified(NamedTuple):
  """What one speculative step leaves: tokens `[B, 1 + k]` (the first emitted_B[b] are the
  output), their logprobs, accepted proposals `[B]`, tokens emitted (and kept in the caches)
  `[B]`, for rows of `Given` the token their next draw gives (-1 elsewhere), the slot logits
  after the last of them, counts, the rejected proposal's draft distribution `sub_BV`, and
  both caches (lengths as the step's feeds left them: the caller rolls them back to the
  emitted tokens)."""
  tokens_BT: jax.Array
  logp_BT: jax.Array
  accepted_B: jax.Array
  emitted_B: jax.Array
  next_B: jax.Array
  logits_BV: jax.Array
  counts_BV: jax.Array
  sub_BV: jax.Array
  cache: Any
  draft_cache: Any


def _verify_given(logits_BV, logits_BTV, batch: Batch, given: Given, drafts_B):
  """For rows with host proposals g_0..g_{j-1}: (emitted n `[B]`, logprobs of g `[B, 1 + k]`,
  logits after g_{n-1} `[B, V]`, the draw at position n `[B]`). Position i draws as plain
  decoding would draw the row's (steps_B + i)-th token (its grammar's mask, its key) from the
  logits before g_i; g_i is kept while the draw equals it. So the output is token for token
  plain decoding's, each proposal is kept with exactly the probability the target gives it,
  and the draw at n (where the first proposal failed, or after the last: given a real mask
  there) is the token the row's next draw will give: the host proposes it next."""
  B, T, V = logits_BTV.shape
  before_BTV = jnp.concatenate([logits_BV[:, None], logits_BTV[:, :T - 1]], axis=1)
  rep = lambda a: jnp.repeat(a, T, axis=0)
  arrays = jax.tree.map(rep, batch.arrays)
  flat_NV = before_BTV.reshape(B * T, V)
  if batch.bias_BV is not None:
    flat_NV = flat_NV + rep(batch.bias_BV)
  flat_NV = sampling.apply_token_mask(flat_NV, given.masks_BTW.reshape(B * T, -1))
  steps_N = (batch.steps_B[:, None] + jnp.arange(T)[None, :]).reshape(-1)
  drawn_BT = sampling.draw(flat_NV, arrays, sampling.row_keys(arrays, steps_N)).reshape(B, T)
  same_BT = (drawn_BT == given.tokens_BT) & (jnp.arange(T)[None, :] < drafts_B[:, None])
  n_B = jnp.sum(jnp.cumprod(same_BT, axis=1), axis=1).astype(jnp.int32)
  logp_BT = jnp.take_along_axis(jax.nn.log_softmax(before_BTV.astype(jnp.float32), axis=-1),
                                given.tokens_BT[..., None], axis=-1)[..., 0]
  # n <= drafts_B <= k = T - 1: the logits after g_{n-1} are before_BTV[:, n].
  after_BV = jnp.take_along_axis(before_BTV, n_B[:, None, None], axis=1)[:, 0]
  return n_B, logp_BT, after_BV, jnp.take_along_axis(drawn_BT, n_B[:, None], axis=1)[:, 0]


def speculate_and_verify(target, draft, cache, draft_cache, logits_BV, counts_BV, sub_BV,
                         batch: Batch, hist_BH, drafts_B, *, k: int, max_ngram: int,
                         penalties: bool, given: Given | None = None) -> Verified:
  """One speculative step on any KV cache: emits 1 to 1 + drafts_B[b] tokens per row.

  The row's logits give t0, drawn from the target's distribution p, or from norm(max(p - s, 0))
  where the previous step rejected a proposal drawn from s (`sub_BV`, zero rows otherwise).
  The draft proposes d_1..d_k from distributions q_i: prompt lookup over the history `hist_BH`
  (the prompt and every token before t0; one-hot q; `draft` None) or a draft model whose cache
  holds what the target's does (it feeds t0 and the proposals). The target scores
  [t0, d_1..d_k] in one pass and d_i is accepted while u_i q_i(d_i) < p_{i-1}(d_i)
  (`jaxllm.inference.acceptance`). That keeps the target's distribution, and greedy rows
  (one-hot p and q) accept exactly the argmax. The new logits are those after the last
  accepted token; the first rejection's q becomes the next step's `sub_BV`. Rows with
  penalties draft nothing (drafts_B = 0): their counts change by t0 alone. Rows with a logit
  bias or under a grammar draw t0 with it and draft nothing, except rows of `given`: their
  drafts_B host proposals, checked against the grammar, are verified from the row's next
  draw on (`_verify_given`: 0 to drafts_B tokens, no penalties).
  """
  B, V = logits_BV.shape
  rows_B = jnp.arange(B)
  active_B, arrays = batch.active_B, batch.arrays
  lengths_B = cache.lengths
  keys_B2 = sampling.row_keys(arrays, batch.steps_B)
  processed_BV = _adjusted_logits(logits_BV, counts_BV, batch, penalties)
  resid_BV = acceptance.residual(sampling.probabilities(processed_BV, arrays), sub_BV)
  t0_B = jnp.where(jnp.sum(sub_BV, -1) > 0, acceptance.sample_from(resid_BV, keys_B2),
                   sampling.draw(processed_BV, arrays, keys_B2))
  if penalties:  # rows of `given` draw no t0 (and have no penalties)
    counted_B = active_B if given is None else active_B & ~given.rows_B
    counts_BV = counts_BV + jax.nn.one_hot(t0_B, V, dtype=jnp.int32) * counted_B[:, None]
  if draft is None:
    hist_BH = hist_BH.at[rows_B, lengths_B].set(t0_B, mode="drop")
    d_Bk = acceptance.ngram_proposals(hist_BH, lengths_B + 1, t0_B, k=k, max_ngram=max_ngram)
    q_BkV = jax.nn.one_hot(d_Bk, V, dtype=jnp.float32)
  else:
    def draft_step(carry, i):
      dcache, tok_B = carry
      # Feeds position lengths + i; within the room the row has while i <= drafts_B. Rows of
      # `given` feed their proposals instead (the target's tokens, for the draft's cache).
      fed_B = active_B & (i <= drafts_B)
      if given is not None:
        tok_B = jnp.where(given.rows_B, given.tokens_BT[:, i], tok_B)
        fed_B &= ~given.rows_B | (i < drafts_B)
      out_B1V, dcache = draft.extend(tok_B[:, None], dcache, fed_B.astype(jnp.int32))
      q_BV = sampling.probabilities(out_B1V[:, 0], arrays)
      d_B = acceptance.sample_from(
          q_BV, jax.vmap(lambda key: jax.random.fold_in(key, 2 + i))(keys_B2))
      return (dcache, d_B), (d_B, q_BV)

    # k + 1 feeds (t0, d_1..d_k): the last only writes d_k's entry, so the draft cache holds
    # every token the target may keep, and its proposal is unused.
    (draft_cache, _), (d_TB, q_TBV) = jax.lax.scan(draft_step, (draft_cache, t0_B),
                                                   jnp.arange(k + 1))
    d_Bk, q_BkV = jnp.moveaxis(d_TB[:k], 0, 1), jnp.moveaxis(q_TBV[:k], 0, 1)
  tokens_BT = jnp.concatenate([t0_B[:, None], d_Bk], axis=1)
  fed_B = (1 + drafts_B) * active_B.astype(jnp.int32)
  if given is not None:
    tokens_BT = jnp.where(given.rows_B[:, None], given.tokens_BT, tokens_BT)
    fed_B = jnp.where(given.rows_B, drafts_B * active_B, fed_B)
  logits_BTV, cache = target.extend(tokens_BT, cache, fed_B)
  p_BTV = acceptance.target_probabilities(logits_BTV, arrays)
  u_Bk = jax.vmap(lambda key: jax.random.uniform(jax.random.fold_in(key, 1), (k,)))(keys_B2)
  n_acc_B = acceptance.accepted_prefix(p_BTV, q_BkV, d_Bk, u_Bk, drafts_B)
  logp_BT = jnp.concatenate([
      sampling.token_logprobs(logits_BV, t0_B)[:, None],
      jnp.take_along_axis(jax.nn.log_softmax(logits_BTV[:, :k], axis=-1), d_Bk[..., None],
                          axis=-1)[..., 0]], axis=1)
  new_BV = jnp.take_along_axis(logits_BTV, n_acc_B[:, None, None], axis=1)[:, 0]
  q_rej_BV = jnp.take_along_axis(q_BkV, jnp.minimum(n_acc_B, k - 1)[:, None, None], axis=1)[:, 0]
  sub_BV = jnp.where((active_B & (n_acc_B < drafts_B))[:, None], q_rej_BV, 0.0)
  emitted_B, next_B = 1 + n_acc_B, jnp.full_like(n_acc_B, -1)
  if given is not None:
    n_given_B, logp_given_BT, after_BV, drawn_B = _verify_given(logits_BV, logits_BTV, batch,
                                                                given, drafts_B)
    g_B = given.rows_B
    n_acc_B = jnp.where(g_B, n_given_B, n_acc_B)
    emitted_B = jnp.where(g_B, n_given_B, emitted_B)
    next_B = jnp.where(g_B, drawn_B, next_B)
    logp_BT = jnp.where(g_B[:, None], logp_given_BT, logp_BT)
    new_BV = jnp.where(g_B[:, None], after_BV, new_BV)
    sub_BV = jnp.where(g_B[:, None], 0.0, sub_BV)
  return Verified(
      tokens_BT, logp_BT, n_acc_B, emitted_B * active_B, next_B,
      jnp.where(active_B[:, None], new_BV, logits_BV), counts_BV, sub_BV, cache, draft_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "k", "max_ngram",
                                             "penalties"),
                   donate_argnames=("state",))
def decode_speculative(graphdef, params, draft_graphdef, draft_params, state: DecodeState,
                       batch: Batch, hist_BH, drafts_B, given: Given | None = None, *, k: int,
                       max_ngram: int, penalties: bool):
  """`speculate_and_verify` on the engine's pages: (tokens `[B, 1 + k]`, their logprobs,
  accepted proposals `[B]`, tokens emitted `[B]`, the next token of rows of `given` `[B]`,
  state). A model draft (`draft_graphdef`) keeps its own pools (`state.dk`, `dv`) under the
  target's page table; one holding the target's LoRA banks (`layer_skip`) proposes with each
  row's adapter. The host keeps each row's cached length (it adds the tokens emitted)."""
  count_trace("engine_decode_speculative")
  table, lengths = batch.page_table_BM, batch.lengths_B
  cache = kv_cache.PagedKVCache(state.k, state.v, table, lengths)
  target = nnx.merge(graphdef, lora_bank.select(params, batch.adapters_B))
  draft, dcache = None, None
  if draft_graphdef is not None:
    draft = nnx.merge(draft_graphdef, lora_bank.select(draft_params, batch.adapters_B))
    dcache = kv_cache.PagedKVCache(state.dk, state.dv, table, lengths)
  out = speculate_and_verify(target, draft, cache, dcache, state.logits_BV, state.counts_BV,
                             state.sub_BV, batch, hist_BH, drafts_B, k=k, max_ngram=max_ngram,
                             penalties=penalties, given=given)
  return out.tokens_BT, out.logp_BT, out.accepted_B, out.emitted_B, out.next_B, DecodeState(
      k=out.cache.k, v=out.cache.v, logits_BV=out.logits_BV, counts_BV=out.counts_BV,
      sub_BV=out.sub_BV, dk=state.dk if dcache is None else out.draft_cache.k,
      dv=state.dv if dcache is None else out.draft_cache.v)
