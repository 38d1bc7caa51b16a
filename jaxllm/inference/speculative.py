"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one pass.

Each iteration of one jitted `lax.while_loop`, for every sequence of the batch at once:
  1. the draft proposes d_1..d_k autoregressively from its distributions q_1..q_k;
  2. the target scores [cur, d_1..d_k] in one forward pass -> p_0..p_k;
  3. d_j is accepted with probability min(1, p_{j-1}(d_j) / q_j(d_j)), up to the first reject;
     after n accepted, one more token comes from norm(max(0, p_n - q_{n+1})), or from p_k
     when all k passed (Leviathan et al. 2023, Chen et al. 2023). The committed tokens are
     then distributed exactly as the target's own samples.
  4. both caches roll back to the committed length (lengths only: see kv_cache).
Greedy rows use one-hot p and q, which turns the same rule into "accept the longest prefix
that equals the target's argmax, then the target's argmax": the output is token for token
that of greedy target decoding.

Draft sources (`Draft`): a smaller model with the same tokenizer, the target's own first
layers (layer-skip self-speculation: same embedding and head), and prompt lookup (the
continuation of the latest earlier occurrence of the context's last n-gram; q is one-hot).

Invariant between iterations: both caches hold every committed token except the newest,
`cur`. A model draft runs k forwards per iteration, so when all k were accepted its cache
misses d_k: the next iteration's first draft step feeds [d_k, cur] (`behind`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

from jaxllm.inference import generate as gen
from jaxllm.inference import sampling
from jaxllm.model import cache as kv_cache
from jaxllm.parallel import placement

DRAFT_KINDS = ("model", "layer_skip", "ngram")


@dataclasses.dataclass(frozen=True)
class Draft:
  kind: str
  graphdef: Any = None
  params: Any = None
  max_ngram: int = 3

  def __post_init__(self):
    if self.kind not in DRAFT_KINDS:
      raise ValueError(f"draft kind {self.kind!r}: one of {', '.join(DRAFT_KINDS)}")


def model_draft(graphdef, params) -> Draft:
  """Any model with the target's tokenizer (vocabulary checked at generation)."""
  return Draft("model", graphdef, params)


def layer_skip_draft(graphdef, params, layers: int) -> Draft:
  """The target's first `layers` blocks, then its final norm and head (no new weights)."""
  from jaxllm.model import transformer
  cfg = gen.model_config(graphdef, params)
  if not 1 <= layers < cfg.n_layers:
    raise ValueError(f"layer-skip draft: layers={layers} must be in [1, {cfg.n_layers})")
  draft_cfg = dataclasses.replace(cfg, n_layers=layers)
  layout = transformer.layer_layout(draft_cfg)
  if cfg.n_experts and not layout.groups:  # the first layers hold no MoE layer
    draft_cfg = dataclasses.replace(draft_cfg, n_experts=0)
    layout = transformer.layer_layout(draft_cfg)
  draft_graphdef, _ = transformer.abstract_params(draft_cfg)
  # The first `layers` layers are prefixes of the dense and of the MoE stack.
  draft_params = {k: v for k, v in params.items() if k not in ("blocks", "moe_blocks")}
  if layout.n_dense:
    draft_params["blocks"] = jax.tree.map(lambda x: x[:layout.n_dense], params["blocks"])
  if layout.groups:
    draft_params["moe_blocks"] = jax.tree.map(lambda x: x[:layout.groups], params["moe_blocks"])
  return Draft("layer_skip", draft_graphdef, draft_params)


def ngram_draft(max_ngram: int = 3) -> Draft:
  """Prompt lookup: match the last n (max_ngram .. 1) tokens earlier in the context."""
  if max_ngram < 1:
    raise ValueError(f"max_ngram={max_ngram} must be >= 1")
  return Draft("ngram", max_ngram=max_ngram)


@dataclasses.dataclass
class Stats:
  iterations: int
  proposed: int
  accepted: int

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / max(self.proposed, 1)


def ngram_proposals(hist_BH, hlen_B, cur_B, *, k: int, max_ngram: int):
  """`[B, k]` tokens following the latest earlier match of the last n committed tokens."""
  B, H = hist_BH.shape
  pos_H = jnp.arange(H)
  found_B = jnp.zeros((B,), bool)
  start_B = jnp.zeros((B,), jnp.int32)  # index of the first proposed token in hist
  for n in range(max_ngram, 0, -1):
    suffix_Bn = jax.vmap(lambda h, l: jax.lax.dynamic_slice(h, (l - n,), (n,)))(
        hist_BH, jnp.maximum(hlen_B, n))
    match_BH = jnp.ones((B, H), bool)
    for j in range(n):
      shifted = jnp.roll(hist_BH, -j, axis=1)  # shifted[b, i] = hist[b, i + j]
      match_BH &= shifted == suffix_Bn[:, j:j + 1]
    # An earlier occurrence whose continuation is committed: i + n < hlen.
    match_BH &= (pos_H[None, :] + n < hlen_B[:, None]) & (hlen_B[:, None] > n)
    latest_B = jnp.max(jnp.where(match_BH, pos_H[None, :], -1), axis=1)
    take_B = ~found_B & (latest_B >= 0)
    start_B = jnp.where(take_B, latest_B + n, start_B)
    found_B |= take_B
  idx_Bk = start_B[:, None] + jnp.arange(k)[None, :]
  # Past the committed history the proposal repeats its last known token.
  idx_Bk = jnp.minimum(idx_Bk, hlen_B[:, None] - 1)
  prop_Bk = jnp.take_along_axis(hist_BH, idx_Bk, axis=1)
  return jnp.where(found_B[:, None], prop_Bk, cur_B[:, None])


def sample_from(probs_BV, keys_B2):
  """Draws from explicit probabilities (one-hot rows give their token)."""
  logits = jnp.where(probs_BV > 0, jnp.log(jnp.maximum(probs_BV, 1e-38)), -jnp.inf)
  return jax.vmap(jax.random.categorical)(keys_B2, logits).astype(jnp.int32)


# ---- The verification core, shared by the offline loop below and the engine's step ----------
# Modified rejection sampling (Leviathan et al., Chen et al.): proposal d_i drawn from q_i is
# kept while u_i q_i(d_i) < p_i(d_i); after the first rejection the next token comes from the
# residual norm(max(p - q, 0)). The target's output distribution is then exactly p, and greedy
# rows (one-hot p and q) keep exactly the target's argmax.


def target_probabilities(logits_BTV, arrays: sampling.SamplingArrays):
  """`[B, T, V]` sampling distributions of the target at each scored position (each row's own
  temperature / top-k / top-p / min-p)."""
  B, T, V = logits_BTV.shape
  rows = jax.tree.map(lambda a: jnp.repeat(a, T, axis=0), arrays)
  return sampling.probabilities(logits_BTV.reshape(B * T, V), rows).reshape(B, T, V)


def accepted_prefix(p_BTV, q_BkV, d_Bk, u_Bk, allowed_B=None):
  """How many leading proposals each row keeps: d_i (drawn from q_i, scored by the target's
  p_i = p_BTV[:, i]) stays while u_i q_i(d_i) < p_i(d_i), for i < allowed_B[b] (default k)."""
  k = d_Bk.shape[1]
  p_at_d = jnp.take_along_axis(p_BTV[:, :k], d_Bk[..., None], axis=-1)[..., 0]
  q_at_d = jnp.take_along_axis(q_BkV, d_Bk[..., None], axis=-1)[..., 0]
  accept_Bk = u_Bk * q_at_d < p_at_d
  if allowed_B is not None:
    accept_Bk &= jnp.arange(k)[None, :] < allowed_B[:, None]
  return jnp.sum(jnp.cumprod(accept_Bk, axis=1), axis=1).astype(jnp.int32)


def residual(p_BV, q_BV):
  """norm(max(p - q, 0)): where the next token is drawn from after a rejected proposal drawn
  from q (p itself where nothing is left, and for zero q rows)."""
  resid_BV = jnp.maximum(p_BV - q_BV, 0.0)
  return jnp.where(jnp.sum(resid_BV, -1, keepdims=True) > 0, resid_BV, p_BV)


@functools.partial(jax.jit, static_argnames=("graphdef", "draft_graphdef", "kind", "k",
                                             "out_len", "max_ngram", "on_tokens"))
def _speculative_loop(graphdef, params, draft_graphdef, draft_params, cache, draft_cache,
                      first_logits_BV, hist_BH, hlen_B, arrays, max_new_B, stop_ids_BX, *,
                      kind: str, k: int, out_len: int, max_ngram: int, on_tokens=None):
  gen.count_trace("speculative_loop")
  target = nnx.merge(graphdef, params)
  draft = None if kind == "ngram" else nnx.merge(draft_graphdef, draft_params)
  B, V = first_logits_BV.shape
  rows_B = jnp.arange(B)
  is_stop = lambda tok: jnp.any(tok[..., None] == stop_ids_BX[:, None, :] if tok.ndim == 2
                                else tok[:, None] == stop_ids_BX, axis=-1)

  # The first token comes from the prefill logits, as in plain decoding.
  tok0_B = sampling.draw(first_logits_BV, arrays, sampling.row_keys(arrays, jnp.zeros_like(hlen_B)))
  stop0_B = is_stop(tok0_B)
  out = jnp.zeros((B, out_len), jnp.int32).at[:, 0].set(tok0_B)
  logp = jnp.zeros((B, out_len), jnp.float32).at[:, 0].set(
      sampling.token_logprobs(first_logits_BV, tok0_B))
  n_B = (~stop0_B).astype(jnp.int32)
  done_B = stop0_B | (n_B >= max_new_B)
  reason_B = jnp.where(stop0_B, 1, jnp.where(done_B, 2, 0))
  hist_BH = hist_BH.at[rows_B, hlen_B].set(tok0_B, mode="drop")

  def cond(c):
    return (c["it"] < out_len) & ~jnp.all(c["done"])

  def body(c):
    active_B = ~c["done"]
    cur_B = c["cur"]
    keys_BX2 = jax.vmap(lambda key: jax.random.split(key, k + 2))(sampling.row_keys(arrays, c["n"]))
    draft_cache = c["draft_cache"]

    # 1. Draft: d [B, k] and q [B, k, V].
    if kind == "ngram":
      d_Bk = ngram_proposals(c["hist"], c["hlen"], cur_B, k=k, max_ngram=max_ngram)
      q_BkV = jax.nn.one_hot(d_Bk, V, dtype=jnp.float32)
      draft_len_B = draft_cache.lengths
    else:
      behind_B = c["behind"]
      first_BT = jnp.stack([jnp.where(behind_B, c["prev"], cur_B),
                            jnp.where(behind_B, cur_B, 0)], axis=1)
      fed_B = (1 + behind_B.astype(jnp.int32)) * active_B
      logits_B1V, draft_cache = draft.extend(first_BT, draft_cache, fed_B, last_only=True)
      draft_len_B = draft_cache.lengths  # holds cur now

      def draft_step(carry, key_B2):
        dcache, logits_BV = carry
        q_BV = sampling.probabilities(logits_BV, arrays)
        d_B = sample_from(q_BV, key_B2)
        next_B1V, dcache = draft.extend(d_B[:, None], dcache, active_B.astype(jnp.int32))
        return (dcache, next_B1V[:, 0]), (d_B, q_BV)

      # k - 1 fed proposals (d_1 .. d_{k-1}); d_k is drawn below without being fed.
      (draft_cache, last_BV), (d_kB, q_kBV) = jax.lax.scan(
          draft_step, (draft_cache, logits_B1V[:, 0]), jnp.moveaxis(keys_BX2[:, :k - 1], 1, 0))
      q_last_BV = sampling.probabilities(last_BV, arrays)
      d_last_B = sample_from(q_last_BV, keys_BX2[:, k - 1])
      d_Bk = jnp.concatenate([jnp.moveaxis(d_kB, 0, 1), d_last_B[:, None]], axis=1)
      q_BkV = jnp.concatenate([jnp.moveaxis(q_kBV, 0, 1), q_last_BV[:, None]], axis=1)

    # 2. Verify: the target scores cur and the k proposals in one pass.
    t_len_B = c["cache"].lengths
    tokens_BT = jnp.concatenate([cur_B[:, None], d_Bk], axis=1)
    logits_BTV, cache = target.extend(tokens_BT, c["cache"], (k + 1) * active_B.astype(jnp.int32))
    p_BTV = target_probabilities(logits_BTV, arrays)

    # 3. Accept a prefix, then the correction (or bonus: all accepted, q = 0) token.
    u_Bk = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(keys_BX2[:, k])
    n_acc_B = accepted_prefix(p_BTV, q_BkV, d_Bk, u_Bk)
    q_pad_BTV = jnp.concatenate([q_BkV, jnp.zeros((B, 1, V), q_BkV.dtype)], axis=1)
    p_n_BV = jnp.take_along_axis(p_BTV, n_acc_B[:, None, None], axis=1)[:, 0]
    q_n_BV = jnp.take_along_axis(q_pad_BTV, n_acc_B[:, None, None], axis=1)[:, 0]
    t_new_B = sample_from(residual(p_n_BV, q_n_BV), keys_BX2[:, k + 1])

    # 4. Commit: accepted proposals then the new token, cut at stop tokens and max_tokens.
    j_T = jnp.arange(k + 1)[None, :]
    commit_BT = jnp.where(j_T < n_acc_B[:, None],
                          jnp.concatenate([d_Bk, d_Bk[:, -1:]], axis=1), t_new_B[:, None])
    count_B = n_acc_B + 1
    stop_BT = is_stop(commit_BT) & (j_T < count_B[:, None])
    stop_at_B = jnp.min(jnp.where(stop_BT, j_T, k + 1), axis=1)
    room_B = max_new_B - c["n"]
    stopped_B = active_B & (stop_at_B < count_B) & (stop_at_B < room_B)
    emit_B = jnp.where(active_B, jnp.where(stopped_B, stop_at_B, jnp.minimum(count_B, room_B)), 0)
    slot_BT = jnp.where(j_T < emit_B[:, None], c["n"][:, None] + j_T, out_len)
    rows_BT = jnp.broadcast_to(rows_B[:, None], slot_BT.shape)
    out = c["out"].at[rows_BT, slot_BT].set(commit_BT, mode="drop")
    logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV, axis=-1), commit_BT[..., None],
                                  axis=-1)[..., 0]
    logp = c["logp"].at[rows_BT, slot_BT].set(logp_BT, mode="drop")
    n_B = c["n"] + emit_B
    length_B = active_B & ~stopped_B & (n_B >= max_new_B)
    reason = jnp.where(stopped_B, 1, jnp.where(length_B, 2, c["reason"]))
    done_B = c["done"] | stopped_B | length_B
    hist_slot_BT = jnp.where(j_T < count_B[:, None] * active_B[:, None],
                             c["hlen"][:, None] + j_T, hist_BH.shape[1])
    hist = c["hist"].at[rows_BT, hist_slot_BT].set(commit_BT, mode="drop")
    if on_tokens is not None:
      io_callback(on_tokens, None, out, n_B, ordered=True)

    # Roll back: the target keeps cur and the accepted proposals; t_new is the next cur.
    committed_B = count_B * active_B
    cache = kv_cache.with_lengths(cache, t_len_B + committed_B)
    new = dict(c, it=c["it"] + 1, cache=cache, cur=jnp.where(active_B, t_new_B, cur_B), out=out,
               logp=logp, n=n_B, done=done_B, reason=reason, hist=hist,
               hlen=c["hlen"] + committed_B,
               proposed=c["proposed"] + k * active_B, accepted=c["accepted"] + n_acc_B * active_B)
    if kind != "ngram":
      # The draft fed cur and d_1 .. d_{k-1}: keep cur and the accepted ones among them.
      kept_B = jnp.where(active_B, jnp.minimum(n_acc_B, k - 1), 0)
      new["draft_cache"] = kv_cache.with_lengths(draft_cache, draft_len_B + kept_B)
      new["behind"] = active_B & (n_acc_B == k) | (~active_B & c["behind"])
      new["prev"] = jnp.where(active_B, d_Bk[:, -1], c["prev"])
    return new

  init = dict(it=jnp.int32(0), cache=cache, draft_cache=draft_cache, cur=tok0_B, out=out,
              logp=logp, n=n_B, done=done_B, reason=reason_B, hist=hist_BH, hlen=hlen_B + 1,
              behind=jnp.zeros((B,), bool), prev=jnp.zeros((B,), jnp.int32),
              proposed=jnp.zeros((B,), jnp.int32), accepted=jnp.zeros((B,), jnp.int32))
  final = jax.lax.while_loop(cond, body, init)
  return (final["out"], final["logp"], final["n"], final["reason"], final["it"],
          final["proposed"], final["accepted"])


def speculative_generate(graphdef, params, prompts: Sequence[Sequence[int]],
                         sampling_params: Sequence[sampling.SamplingParams], draft: Draft, *,
                         k: int = 4, eos_id: int = -1, max_seq_len: int | None = None,
                         cache: str = "contiguous", page_size: int = 16,
                         prefill_chunk: int = 256, cache_dtype=jnp.float32,
                         on_tokens: gen.OnTokens | None = None
                         ) -> tuple[list[gen.Generation], Stats]:
  """Like `generate.generate_requests`, with `k` draft tokens verified per target pass (on the
  params' mesh when they are placed on one; a model draft must be placed on the same)."""
  mesh = placement.mesh_of(params)
  gen.check_on_tokens(on_tokens, mesh)
  with placement.in_mesh(mesh):
    return _speculative_generate(graphdef, params, prompts, sampling_params, draft, k=k,
                                 eos_id=eos_id, max_seq_len=max_seq_len, cache=cache,
                                 page_size=page_size, prefill_chunk=prefill_chunk,
                                 cache_dtype=cache_dtype, mesh=mesh, on_tokens=on_tokens)


def _speculative_generate(graphdef, params, prompts, sampling_params, draft, *, k, eos_id,
                          max_seq_len, cache, page_size, prefill_chunk, cache_dtype, mesh,
                          on_tokens):
  if not 1 <= k <= 16:
    raise ValueError(f"k={k}: speculate 1 to 16 tokens per step")
  if any(sp.uses_penalties for sp in sampling_params):
    raise ValueError("speculative decoding does not take repetition/frequency/presence "
                     "penalties (they change the distribution token by token)")
  cfg = gen.model_config(graphdef, params)
  gen.check_prompts(prompts, sampling_params, cfg.vocab_size, max_seq_len)
  chunk = gen.chunk_size(max(len(p) for p in prompts), prefill_chunk)
  padded = -(-max(len(p) for p in prompts) // chunk) * chunk
  max_new = max(sp.max_tokens for sp in sampling_params)
  S = gen.bucket(padded + max_new + k + 1)
  needed = [len(p) + sp.max_tokens + k + 1 for p, sp in zip(prompts, sampling_params)]
  step = max(chunk, k + 1)  # prefill chunks; k proposals verified with the last token
  t_cache = gen.new_cache(cfg, cache, needed, max_len=S, page_size=page_size, dtype=cache_dtype,
                          mesh=mesh, longest_step=step)
  first, t_cache = gen.prefill(graphdef, params, prompts, t_cache, prefill_chunk=prefill_chunk,
                               vocab_size=cfg.vocab_size)
  if draft.kind == "ngram":
    d_graphdef, d_params = None, None
    d_cache = kv_cache.KVCache(jnp.zeros(()), jnp.zeros(()), jnp.zeros((len(prompts),), jnp.int32))
  else:
    d_graphdef, d_params = draft.graphdef, draft.params
    d_cfg = gen.model_config(d_graphdef, d_params)
    if d_cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"draft vocabulary {d_cfg.vocab_size} differs from the target's "
                       f"{cfg.vocab_size}: the draft needs the target's tokenizer")
    d_cache = gen.new_cache(d_cfg, cache, needed, max_len=S, page_size=page_size,
                            dtype=cache_dtype, mesh=mesh, longest_step=step)
    _, d_cache = gen.prefill(d_graphdef, d_params, prompts, d_cache,
                             prefill_chunk=prefill_chunk, vocab_size=cfg.vocab_size)
  hist, lengths = gen.pad_prompts(prompts, 1)
  H = gen.bucket(hist.shape[1] + max_new + k + 1)
  hist = np.pad(hist, ((0, 0), (0, H - hist.shape[1])))
  out_len = gen.bucket(max_new)
  out, logp, n, reason, it, proposed, accepted = jax.device_get(_speculative_loop(
      graphdef, params, d_graphdef, d_params, t_cache, d_cache, first, jnp.asarray(hist),
      jnp.asarray(lengths), sampling.SamplingArrays.of(sampling_params),
      jnp.asarray([sp.max_tokens for sp in sampling_params], jnp.int32),
      jnp.asarray(gen.stop_id_array(sampling_params, eos_id)), kind=draft.kind, k=k,
      out_len=out_len, max_ngram=draft.max_ngram, on_tokens=on_tokens))
  results = [gen.Generation(out[b, :n[b]].tolist(), logp[b, :n[b]].tolist(),
                            gen.FINISH_REASONS.get(int(reason[b]), "length"))
             for b in range(len(prompts))]
  return results, Stats(int(it), int(proposed.sum()), int(accepted.sum()))
