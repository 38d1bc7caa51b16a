"""`python -m jaxllm.eval --checkpoint=PATH --data=FILES [--max_len=N --stride=S --batch_size=B
[--kv_cache_dtype=int8] [--prefill_chunk=C]]`

Per-token loss and perplexity of a model over text files (comma-separated paths, directories or
globs; a .jsonl file's records are its documents, as in training). Long documents are scored
with a sliding window: windows of `max_len` tokens advance by
`stride`, and each token is scored once, in the first window where it has the most context
that window allows. The last stdout line is one JSON object: {"loss", "ppl", "tokens", "files"}.
Long windows (8k tokens and more) fit in memory with `--prefill_chunk`: each window then goes
through the KV cache C tokens at a time, so attention holds `[C, max_len]` scores, not
`[max_len, max_len]`.

`--scores_out=DIR` also writes every document with its own loss as "difficulty" (its other
JSONL fields kept) to sharded JSONL in DIR, the way `python -m jaxllm.data prepare` writes
(staged, `report.json` last): training with `--config.data.order=difficulty` on DIR then
visits documents easiest first (a curriculum by a reference model's loss).
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
_SCORES_OUT = flags.DEFINE_string(
    "scores_out", None, "Also write each document with its loss as 'difficulty' here "
    "(sharded JSONL + report.json), for data.order=difficulty.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a complete earlier --scores_out.")
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


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.initialize_distributed()
  import jaxllm
  from jaxllm.data import corpus, prepare
  files = corpus.expand_paths([p for p in _DATA.value.split(",") if p])
  stride = _STRIDE.value or max(1, _MAX_LEN.value // 2)
  if stride > _MAX_LEN.value - 1:
    raise common.CommandError(f"--stride={stride} must be below --max_len={_MAX_LEN.value}")
  found = [corpus.file_documents(f) for f in files]
  docs = [d for f in found for d in f.docs]
  undecodable = [u for f in found for u in f.undecodable]
  if undecodable:
    print(f"warning: {len(undecodable)} of --data's files or records are not UTF-8 and are not "
          f"scored (first: {undecodable[0]})", file=sys.stderr)
  if _SCORES_OUT.value:
    try:  # refuse a bad output directory before any scoring
      prepare.open_output(_SCORES_OUT.value, _OVERWRITE.value)
    except prepare.PrepareError as e:
      raise common.CommandError(str(e).replace("--out=", "--scores_out=")) from None
  model = jaxllm.load(_CHECKPOINT.value, mesh=_MESH.value)
  texts = [corpus.read_document(d) for d in docs]
  doc_nll, doc_tokens = score_texts(
      model, texts, max_len=_MAX_LEN.value, stride=stride, batch_size=_BATCH.value,
      progress=_PROGRESS.value, kv_cache_dtype=_KV_CACHE.value,
      prefill_chunk=_PREFILL_CHUNK.value)
  nll, tokens = float(doc_nll.sum()), float(doc_tokens.sum())
  if tokens == 0:
    raise common.CommandError("no tokens to score (empty files?)")
  loss = nll / tokens
  summary = {"loss": loss, "ppl": math.exp(loss), "tokens": int(tokens), "files": len(files),
             "undecodable": len(undecodable)}
  if _SCORES_OUT.value:
    write_scores(_SCORES_OUT.value, docs, texts, doc_nll, doc_tokens,
                 {**summary, "checkpoint": _CHECKPOINT.value}, progress=_PROGRESS.value)
  print(json.dumps(summary))


def write_scores(out: str, docs, texts, doc_nll, doc_tokens, report: dict, *,
                 progress: bool = True) -> None:
  """Writes each document (`corpus.DocRef`, its text) with its mean NLL as "difficulty" (0 for
  one too short to score) to OUT, made ready by `prepare.open_output`; `report` goes into
  OUT/report.json with the difficulty quantiles."""
  import numpy as np

  from jaxllm.data import prepare
  difficulty = doc_nll / np.maximum(doc_tokens, 1)

  def records():
    for doc, text, d in zip(docs, texts, difficulty):
      fields = {"source": doc.path}
      if doc.jsonl_offset >= 0:
        with open(doc.path, "rb") as f:
          f.seek(doc.jsonl_offset)
          record = json.loads(f.readline())
        fields = record if isinstance(record, dict) else {}
      yield {**fields, "text": text, "difficulty": round(float(d), 5)}

  prepare.write_shards(out, records(), len(docs), 10_000, progress)
  quantiles = np.quantile(difficulty, [0.0, 0.1, 0.5, 0.9, 1.0]).round(4).tolist()
  prepare.finish_output(out, {**report, "docs": len(docs),
                              "difficulty_quantiles_0_10_50_90_100": quantiles})


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
