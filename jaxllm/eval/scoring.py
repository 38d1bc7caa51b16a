"""Sliding-window scoring of texts with a model: per-token loss and perplexity (what `python -m
jaxllm.eval` reports, and what its `--scores_out` ranks documents by).

Windows of `max_len` tokens advance by `stride`; each token after a text's first is scored once,
in the first window where it has the most context that window allows.
"""

from __future__ import annotations

import functools
import sys

def windows(ids: list[int], max_len: int, stride: int):
  """Yields (tokens, score_from): score targets tokens[score_from + 1:] of each window.

  Target j of a window is tokens[j + 1]; every token after the first is scored exactly once.
  """
  scored_until = 0  # ids[1:scored_until + 1] already scored
  begin = 0
  while True:
    end = min(begin + max_len, len(ids))
    first_new = max(scored_until, begin)  # index in ids of the first target's predecessor
    if end - 1 > first_new:
      yield ids[begin:end], first_new - begin
      scored_until = end - 1
    if end == len(ids):
      return
    begin += stride


def evaluate(model, texts, *, max_len: int, stride: int, batch_size: int, progress: bool = True,
             kv_cache_dtype: str | None = None, prefill_chunk: int | None = None):
  """Sum of NLL and token count over `texts` with the sliding window (through a KV cache of
  `kv_cache_dtype` when given; `prefill_chunk` tokens at a time when given)."""
  nll, tokens = score_texts(model, texts, max_len=max_len, stride=stride, batch_size=batch_size,
                            progress=progress, kv_cache_dtype=kv_cache_dtype,
                            prefill_chunk=prefill_chunk)
  return float(nll.sum()), float(tokens.sum())


def score_texts(model, texts, *, max_len: int, stride: int, batch_size: int,
                progress: bool = True, kv_cache_dtype: str | None = None,
                prefill_chunk: int | None = None):
  """Per text of `texts`: (sum of NLL, scored tokens), float64 arrays `[len(texts)]`, scored as
  `evaluate` describes."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from tqdm import tqdm

  from jaxllm.model import cache as kv_cache
  from jaxllm.parallel import placement
  from jaxllm.train import losses

  cfg = model.config
  piece = None if prefill_chunk is None else min(prefill_chunk, max_len)
  cache_dtype = jnp.dtype(kv_cache_dtype or "float32")
  # Rows are whole chunks long; the padding carries no weight.
  width = max_len if piece is None else -(-max_len // piece) * piece

  def new_cache(batch):
    return kv_cache.init_cache(cfg.n_layers, batch, width, cfg.n_kv_heads, cfg.head_dim,
                               cache_dtype)

  def row_sums(logits_BTV, targets_BT, weights_BT):
    """(NLL [B], weight [B]): the loss sums of each row on its own."""
    one_row = lambda l, t, w: losses.cross_entropy_sums(l[None], t[None], w[None])
    nll_B, _, w_B = jax.vmap(one_row)(logits_BTV, targets_BT, weights_BT)
    return nll_B, w_B

  @jax.jit
  def score(params, tokens_BT, targets_BT, weights_BT):
    net = nnx.merge(model.graphdef, params)
    if kv_cache_dtype is None:
      logits_BTV = net(tokens_BT)
    else:
      logits_BTV, _ = net.extend(tokens_BT, new_cache(tokens_BT.shape[0]))
    return row_sums(logits_BTV, targets_BT, weights_BT)

  @functools.partial(jax.jit, donate_argnums=(1,))
  def score_chunk(params, cache, tokens_BC, targets_BC, weights_BC):
    logits_BCV, cache = nnx.merge(model.graphdef, params).extend(tokens_BC, cache)
    return (*row_sums(logits_BCV, targets_BC, weights_BC), cache)

  def score_window(params, tokens, targets, weights):
    if piece is None:
      return score(params, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(weights))
    cache, nll, w = new_cache(tokens.shape[0]), 0.0, 0.0
    for lo in range(0, width, piece):
      part = slice(lo, lo + piece)
      n, c, cache = score_chunk(params, cache, jnp.asarray(tokens[:, part]),
                                jnp.asarray(targets[:, part]), jnp.asarray(weights[:, part]))
      nll, w = nll + n, w + c
    return nll, w

  jobs = []  # (text index, window tokens, score_from)
  for t, text in enumerate(texts):
    ids = model.prompt_ids(text)
    jobs.extend((t, *job) for job in windows(ids, max_len, stride))
  text_nll, text_tokens = np.zeros(len(texts)), np.zeros(len(texts))
  bar = tqdm(total=len(jobs), desc="eval", unit="window", disable=not progress, file=sys.stderr)
  for start in range(0, len(jobs), batch_size):
    chunk = jobs[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for row, (_, win, score_from) in enumerate(chunk):
      n = len(win)
      tokens[row, :n] = win
      targets[row, :n - 1] = win[1:]
      weights[row, score_from:n - 1] = 1.0
    with placement.in_mesh(placement.mesh_of(model.params)):
      nll_B, w_B = jax.device_get(score_window(model.params, tokens, targets, weights))
    for row, (t, _, _) in enumerate(chunk):
      text_nll[t] += float(nll_B[row])
      text_tokens[t] += float(w_B[row])
    bar.update(len(chunk))
  bar.close()
  return text_nll, text_tokens
