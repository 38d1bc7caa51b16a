"""The engine's device side: its state, and the jitted steps run on it.

`Runner` owns the model (and a speculative draft model), the device state every step donates
and returns (`steps.DecodeState`: page pools, per-slot logits, counts, the speculative
residual, a draft's pools) and the slots' sampling arrays, and runs one step at a time on what
the scheduler decided (`scheduler.Scheduler.batch_arrays`): a prefill chunk, a decode step, a
mixed step, a speculative step. It reads no request's state beyond what a step needs, and
decides nothing: which rows run is the scheduler's, what the tokens mean is the engine's.
Offline generation runs the same step bodies in device loops (`device_loops`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.inference import generate as gen
from jaxllm.inference import acceptance, paging, sampling, speculative
from jaxllm.inference import steps as steps_lib
from jaxllm.lora import bank as lora_bank
from jaxllm.parallel import placement


class Runner:
  """Device state and steps of one engine (`config`: its `engine.EngineConfig`)."""

  def __init__(self, graphdef, params, config, *, max_seq_len: int,
               draft: speculative.Draft | None = None):
    """`draft`: a model draft (`speculative.model_draft`, `layer_skip_draft`) with the target's
    vocabulary, which gets its own page pool; None for prompt lookup or no speculation."""
    self.graphdef, self.params, self.config = graphdef, params, config
    self.model_config = cfg = gen.model_config(graphdef, params)
    self.adapter_slots = lora_bank.size(params)
    # Params placed on a mesh (`placement.place_params`) put the engine there: page pools split
    # over KV heads, every step traced with the mesh in context.
    self.mesh = placement.mesh_of(params)
    self.stream = config.stream
    self.draft = draft
    dk = dv = None
    if draft is not None:
      dk, dv = self._draft_pools(draft, max_seq_len)
    # A layer-skip draft shares the target's params, LoRA banks included.
    self.draft_banked = draft is not None and lora_bank.size(draft.params) > 1
    B, V = config.max_slots, cfg.vocab_size
    shape = (cfg.n_layers, config.num_pages, config.page_size, cfg.n_kv_heads, cfg.head_dim)
    self.state = steps_lib.DecodeState(
        k=placement.zeros_on(self.mesh, shape, config.cache_dtype, paged=True),
        v=placement.zeros_on(self.mesh, shape, config.cache_dtype, paged=True),
        logits_BV=jnp.zeros((B, V), jnp.float32), counts_BV=jnp.zeros((B, V), jnp.int32),
        sub_BV=jnp.zeros((B, V), jnp.float32), dk=dk, dv=dv)
    self.prompt_mask = np.zeros((B, V), bool)  # each slot's prompt tokens (penalties)
    self._arrays_for: tuple | None = None  # the slot occupants' params `_arrays` was built for
    self._arrays = None
    self._bias = None
    self.penalties = False  # whether some slot's request uses penalties

  @property
  def cache_window(self) -> int:
    """The attention window the pages may be released behind (0: none). A model draft reads
    the same columns of its own pool, so only what both models' windows have passed goes."""
    windows = [self.model_config.cache_window]
    if self.draft is not None:
      windows.append(gen.model_config(self.draft.graphdef, self.draft.params).cache_window)
    return 0 if 0 in windows else max(windows)

  def _draft_pools(self, draft: speculative.Draft, max_seq_len: int):
    dcfg = gen.model_config(draft.graphdef, draft.params)
    if dcfg.vocab_size != self.model_config.vocab_size:
      raise ValueError(f"the draft's vocabulary ({dcfg.vocab_size}) is not the target's "
                       f"({self.model_config.vocab_size})")
    if dcfg.max_seq_len < max_seq_len:
      raise ValueError(f"the draft's context ({dcfg.max_seq_len}) is shorter than the "
                       f"engine's ({max_seq_len})")
    if placement.mesh_of(draft.params) != self.mesh:
      raise ValueError("the draft model must be placed on the target's mesh")
    shape = (dcfg.n_layers, self.config.num_pages, self.config.page_size, dcfg.n_kv_heads,
             dcfg.head_dim)
    return (placement.zeros_on(self.mesh, shape, self.config.cache_dtype, paged=True),
            placement.zeros_on(self.mesh, shape, self.config.cache_dtype, paged=True))

  def set_params(self, params) -> None:
    """New weights of the same structure, shapes, dtypes and placement (ValueError else)."""
    if self.draft is not None:
      raise ValueError("set_params would leave the speculative draft on the old weights: "
                       "build a new engine with the draft of the new ones")
    old, new = jax.tree.structure(self.params), jax.tree.structure(params)
    if old != new:
      raise ValueError("set_params: the new params' structure differs from the engine's")
    for a, b in zip(jax.tree.leaves(self.params), jax.tree.leaves(params)):
      if (a.shape, a.dtype) != (b.shape, b.dtype):
        raise ValueError(f"set_params: a weight of shape {a.shape} {a.dtype} would become "
                         f"{b.shape} {b.dtype}")
    if placement.mesh_of(params) != self.mesh:
      raise ValueError("set_params: the new params are not on the engine's mesh")
    self.params = params

  # ---- per-slot state -------------------------------------------------------------------

  def start_slot(self, slot: int, prompt: Sequence[int]) -> None:
    """A request took the slot: its prompt's tokens are what presence penalties look at."""
    self.prompt_mask[slot] = False
    self.prompt_mask[slot, prompt] = True

  def set_logits(self, slot: int, logits_V) -> None:
    """The slot's next draw reads `logits_V` (its prefill is done), owing no residual."""
    state = self.state
    self.state = state._replace(logits_BV=state.logits_BV.at[slot].set(logits_V),
                                sub_BV=state.sub_BV.at[slot].set(0.0))

  def set_counts(self, slot: int, tokens: Sequence[int]) -> None:
    """The slot's penalty counts are those of `tokens` (a recomputed request's output)."""
    counts = 0
    if tokens:
      counts = jnp.asarray(np.bincount(tokens, minlength=self.model_config.vocab_size),
                           jnp.int32)
    self.state = self.state._replace(counts_BV=self.state.counts_BV.at[slot].set(counts))

  def refresh_sampling(self, slot_params: Sequence[sampling.SamplingParams | None]) -> None:
    """Rebuilds the slots' sampling arrays when a slot changed hands (held objects, so
    identity is safe); None: an empty slot."""
    if self._arrays_for is not None and all(
        a is b for a, b in zip(slot_params, self._arrays_for)):
      return
    params = [p if p is not None else sampling.SamplingParams() for p in slot_params]
    self._arrays, self._arrays_for = sampling.SamplingArrays.of(params), tuple(slot_params)
    self.penalties = any(p.uses_penalties for p in params)
    self._bias = None  # [B, V] on the device while some slot's request has a logit_bias
    if any(p.logit_bias for p in params):
      bias = np.zeros((len(params), self.model_config.vocab_size), np.float32)
      for row, p in enumerate(params):
        for t, b in p.logit_bias:
          bias[row, t] = b
      self._bias = jnp.asarray(bias)

  def adapters(self, slot_adapters: Sequence[int]) -> jax.Array | None:
    """Each row's adapter slot where the params hold LoRA banks, else None."""
    if self.adapter_slots == 1:
      return None
    return jnp.asarray(slot_adapters, jnp.int32)

  def batch(self, table, lengths, active, steps, adapters, mask) -> steps_lib.Batch:
    """A step's `steps.Batch` from its host arrays and the slots' sampling state."""
    return steps_lib.Batch(
        page_table_BM=jnp.asarray(table), lengths_B=jnp.asarray(lengths),
        active_B=jnp.asarray(active), steps_B=jnp.asarray(steps), arrays=self._arrays,
        prompt_mask_BV=jnp.asarray(self.prompt_mask), adapters_B=adapters,
        bias_BV=self._bias, mask_BW=mask)

  # ---- steps ----------------------------------------------------------------------------

  def prefill(self, pages: Sequence[list[int]], starts: Sequence[int],
              chunks: Sequence[Sequence[int]], adapters: Sequence[int], width: int):
    """Rows' next prompt chunks (`chunks[i]` at position `starts[i]` under page list
    `pages[i]`) into the pools, the draft's too, in one call of `prefill_rows` rows (the rest
    write nothing): the logits after each row's last new token `[R, V]`."""
    R, C = self.config.prefill_rows, self.config.prefill_chunk
    n = len(chunks)
    table = np.zeros((R, width), np.int32)
    table[:n] = paging.page_table_array(list(pages), width)
    lengths, tokens, num_new = (np.zeros(R, np.int32), np.zeros((R, C), np.int32),
                                np.zeros(R, np.int32))
    for i, chunk in enumerate(chunks):
      tokens[i, :len(chunk)], lengths[i], num_new[i] = chunk, starts[i], len(chunk)
    adapter = self.adapters([*adapters, *[0] * (R - n)])
    draft = self.draft
    logits, self.state = steps_lib.prefill_chunk(
        self.graphdef, self.params, self.state, jnp.asarray(table), jnp.asarray(lengths),
        jnp.asarray(tokens), jnp.asarray(num_new), adapter,
        None if draft is None else draft.graphdef, None if draft is None else draft.params,
        adapter if self.draft_banked else None, stream=self.stream)
    return logits

  def decode(self, batch: steps_lib.Batch):
    """Dispatches a decode step: (token `[B]`, logprob `[B]`) on the device."""
    tok, logp, self.state = steps_lib.decode(self.graphdef, self.params, self.state, batch,
                                             penalties=self.penalties, stream=self.stream)
    return tok, logp

  def mixed(self, batch: steps_lib.Batch, prompt_tokens, ends):
    """Dispatches a mixed step (`steps.mixed`): (token `[B]`, logprob `[B]`) on the device."""
    tok, logp, self.state = steps_lib.mixed(self.graphdef, self.params, self.state, batch,
                                            jnp.asarray(prompt_tokens), jnp.asarray(ends),
                                            penalties=self.penalties)
    return tok, logp

  def speculative(self, batch: steps_lib.Batch, hist, drafts, given=None):
    """Runs a speculative step: (tokens `[B, 1 + k]`, logprobs, accepted `[B]`, emitted `[B]`,
    the next token of `given` rows `[B]`) on the host. `hist` `[B, H]`: each slot's sequence (prompt lookup; None with a model
    draft). `given`: (rows `[B]` bool, tokens `[B, 1 + k]`, masks `[B, 1 + k, W]`) of the
    grammar-checked proposals (`steps.Given`), or None."""
    draft = self.draft or speculative.Draft("ngram")
    if given is not None:
      given = steps_lib.Given(*(jnp.asarray(a) for a in given))
    tokens, logp, n_acc, emitted, next_tokens, self.state = steps_lib.decode_speculative(
        self.graphdef, self.params, draft.graphdef, draft.params, self.state, batch,
        None if hist is None else jnp.asarray(hist), jnp.asarray(drafts), given,
        k=self.config.speculative_k, max_ngram=self.config.speculative_ngram,
        penalties=self.penalties)
    return placement.to_host((tokens, logp, n_acc, emitted, next_tokens))

  def lookup(self, hist, lengths, k: int):
    """Prompt lookup on the host's behalf: `[R, k]` tokens continuing each row's latest
    earlier match of its last n-gram (`hist` `[R, H]`, the first `lengths[r]` real), -1 where
    none (`acceptance.ngram_proposals`, the engine steps' own)."""
    return np.asarray(_lookup(jnp.asarray(hist), jnp.asarray(lengths),
                              jnp.full((len(lengths),), -1, jnp.int32), k=k,
                              max_ngram=self.config.speculative_ngram))


_lookup = jax.jit(acceptance.ngram_proposals, static_argnames=("k", "max_ngram"))


def check_draft(draft: speculative.Draft | None, config):
  """(the model draft or None, the config with prompt lookup's n-gram) for `Engine(draft=)`."""
  if draft is not None and not config.speculative_k:
    raise ValueError("a draft needs speculative_k >= 1")
  if draft is None or draft.kind == "ngram":
    if draft is not None and draft.max_ngram != config.speculative_ngram:
      config = dataclasses.replace(config, speculative_ngram=draft.max_ngram)
    return None, config
  return draft, config
