"""`python -m jaxllm.eval --checkpoint=PATH --data=FILES [--max_len=N --stride=S --batch_size=B
[--kv_cache_dtype=int8] [--prefill_chunk=C]]`

Per-token loss and perplexity of a model over text files (comma-separated paths, directories or
globs). Long files are scored with a sliding window: windows of `max_len` tokens advance by
`stride`, and each token is scored once, in the first window where it has the most context
that window allows. The last stdout line is one JSON object: {"loss", "ppl", "tokens", "files"}.
Long windows (8k tokens and more) fit in memory with `--prefill_chunk`: each window then goes
through the KV cache C tokens at a time, so attention holds `[C, max_len]` scores, not
`[max_len, max_len]`.
"""

from __future__ import annotations

import functools
import json
import math
import sys

from absl import app, flags

from jaxllm.cli import common
from jaxllm.config import KV_CACHE_DTYPES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, jaxllm/HF directory or .gguf.")
_DATA = flags.DEFINE_string("data", None, "Comma-separated text files, directories or globs.")
_MAX_LEN = flags.DEFINE_integer("max_len", 512, "Window length in tokens.", lower_bound=2)
_STRIDE = flags.DEFINE_integer("stride", None, "Window step (default max_len // 2).",
                               lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 4, "Windows per forward pass.", lower_bound=1)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_KV_CACHE = flags.DEFINE_enum("kv_cache_dtype", None, list(KV_CACHE_DTYPES),
                              "Score through a KV cache of this dtype (each window prefilled "
                              "into it, attention reading the cached K/V), as decoding would; "
                              "default: a plain forward pass.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None, "Score each window through the KV cache this many tokens at a time "
    "(long contexts within memory; default: the whole window at once).", lower_bound=1)
_MESH = common.define_mesh_flag()
flags.mark_flags_as_required(["checkpoint", "data"])


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

  @jax.jit
  def score(params, tokens_BT, targets_BT, weights_BT):
    net = nnx.merge(model.graphdef, params)
    if kv_cache_dtype is None:
      logits_BTV = net(tokens_BT)
    else:
      logits_BTV, _ = net.extend(tokens_BT, new_cache(tokens_BT.shape[0]))
    nll, _, w = losses.cross_entropy_sums(logits_BTV, targets_BT, weights_BT)
    return nll, w

  @functools.partial(jax.jit, donate_argnums=(1,))
  def score_chunk(params, cache, tokens_BC, targets_BC, weights_BC):
    logits_BCV, cache = nnx.merge(model.graphdef, params).extend(tokens_BC, cache)
    nll, _, w = losses.cross_entropy_sums(logits_BCV, targets_BC, weights_BC)
    return nll, w, cache

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

  jobs = []
  for text in texts:
    ids = model.prompt_ids(text)
    jobs.extend(windows(ids, max_len, stride))
  total_nll, total_tokens = 0.0, 0.0
  bar = tqdm(total=len(jobs), desc="eval", unit="window", disable=not progress, file=sys.stderr)
  for start in range(0, len(jobs), batch_size):
    chunk = jobs[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    targets = np.zeros((batch_size, width), np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for row, (win, score_from) in enumerate(chunk):
      n = len(win)
      tokens[row, :n] = win
      targets[row, :n - 1] = win[1:]
      weights[row, score_from:n - 1] = 1.0
    with placement.in_mesh(placement.mesh_of(model.params)):
      nll, w = score_window(model.params, tokens, targets, weights)
    total_nll += float(nll)
    total_tokens += float(w)
    bar.update(len(chunk))
  bar.close()
  return total_nll, total_tokens


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.initialize_distributed()
  import jaxllm
  from jaxllm.data import corpus
  files = corpus.expand_paths([p for p in _DATA.value.split(",") if p])
  model = jaxllm.load(_CHECKPOINT.value, mesh=_MESH.value)
  texts = [corpus.read_document(corpus.DocRef(f)) for f in files]
  stride = _STRIDE.value or max(1, _MAX_LEN.value // 2)
  if stride > _MAX_LEN.value - 1:
    raise common.CommandError(f"--stride={stride} must be below --max_len={_MAX_LEN.value}")
  nll, tokens = evaluate(model, texts, max_len=_MAX_LEN.value, stride=stride,
                         batch_size=_BATCH.value, progress=_PROGRESS.value,
                         kv_cache_dtype=_KV_CACHE.value, prefill_chunk=_PREFILL_CHUNK.value)
  if tokens == 0:
    raise common.CommandError("no tokens to score (empty files?)")
  loss = nll / tokens
  print(json.dumps({"loss": loss, "ppl": math.exp(loss), "tokens": int(tokens),
                    "files": len(files)}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
