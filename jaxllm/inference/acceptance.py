"""Speculative sampling's acceptance rule and proposal sources, shared by every speculative loop.

Modified rejection sampling (Leviathan et al. 2023, Chen et al. 2023): proposal d_i drawn from
q_i is kept while u_i q_i(d_i) < p_i(d_i); after the first rejection the next token comes from
the residual norm(max(p - q, 0)). The target's output distribution is then exactly p, and
greedy rows (one-hot p and q) keep exactly the target's argmax. Prompt lookup proposes the
continuation of the latest earlier occurrence of the context's last n-gram (q one-hot).
"""

import jax
import jax.numpy as jnp

from jaxllm.inference import sampling


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
