"""`python -m jaxllm.eval --checkpoint=PATH --data=FILES [--max_seq_len=N --stride=S --batch_size=B
[--kv_cache_dtype=int8] [--prefill_chunk=C]]`
`python -m jaxllm.eval --checkpoint=PATH --choices=ITEMS.jsonl`

Per-token loss and perplexity of a model over text files (comma-separated paths, directories or
globs; a .jsonl file's records are its documents, as in training). Long documents are scored
with a sliding window: windows of `max_seq_len` tokens advance by
`stride`, and each token is scored once, in the first window where it has the most context
that window allows. The last stdout line is one JSON object: {"loss", "ppl", "tokens", "files"}.
Long windows (8k tokens and more) fit in memory with `--prefill_chunk`: each window then goes
through the KV cache C tokens at a time, so attention holds `[C, max_seq_len]` scores, not
`[max_seq_len, max_seq_len]`.

`--choices=ITEMS.jsonl` instead scores multiple-choice items ({"context", "choices", "gold"}) by
loglikelihood (`jaxllm.eval.choices`): the last stdout line is {"acc", "acc_norm", "n"}, the
numbers lm-evaluation-harness reports for the same items against `python -m jaxllm.serve`
(`examples/lm_eval/`).

`--scores_out=DIR` also writes every document with its own loss as "difficulty" (its other
JSONL fields kept) to sharded JSONL in DIR, the way `python -m jaxllm.data prepare` writes
(staged, `report.json` last): training with `--config.data.order=difficulty` on DIR then
visits documents easiest first (a curriculum by a reference model's loss).
"""

from __future__ import annotations

import json
import math
import sys

from absl import app, flags

from jaxllm.cli import common
from jaxllm.config import KV_CACHE_DTYPES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, jaxllm/HF directory or .gguf.")
_DATA = flags.DEFINE_string("data", None, "Comma-separated text files, directories or globs.")
_CHOICES = flags.DEFINE_string("choices", None, "Instead of --data: multiple-choice items "
                               "(JSONL of context, choices, gold) scored by loglikelihood.")
_MAX_LEN = flags.DEFINE_integer("max_seq_len", 512, "Window length in tokens.", lower_bound=2)
_STRIDE = flags.DEFINE_integer("stride", None, "Window step (default max_seq_len // 2).",
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
_ADAPTER = common.define_adapter_flag()
common.define_old_spelling("max_len", "max_seq_len")
flags.mark_flags_as_required(["checkpoint"])
flags.register_multi_flags_validator(
    ["data", "choices"], lambda v: (v["data"] is None) != (v["choices"] is None),
    message="give one of --data (text to score) and --choices (multiple-choice items)")


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.initialize_distributed()
  import jaxllm
  if _CHOICES.value:
    _choices()
    return
  from jaxllm.data import corpus, prepare
  from jaxllm.eval import scores_out, scoring
  files = corpus.expand_paths([p for p in _DATA.value.split(",") if p])
  stride = _STRIDE.value or max(1, _MAX_LEN.value // 2)
  if stride > _MAX_LEN.value - 1:
    raise common.CommandError(f"--stride={stride} must be below --max_seq_len={_MAX_LEN.value}")
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
  model = jaxllm.load(_CHECKPOINT.value, mesh=_MESH.value, adapter=_ADAPTER.value)
  texts = [corpus.read_document(d) for d in docs]
  doc_nll, doc_tokens = scoring.score_texts(
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
    scores_out.write_scores(_SCORES_OUT.value, docs, texts, doc_nll, doc_tokens,
                 {**summary, "checkpoint": _CHECKPOINT.value}, progress=_PROGRESS.value)
  print(json.dumps(summary))


def _choices():
  import jaxllm
  from jaxllm.eval import choices
  try:
    items = choices.read_items(_CHOICES.value)
  except (OSError, ValueError) as e:
    raise common.CommandError(f"--choices: {e}") from None
  model = jaxllm.load(_CHECKPOINT.value, mesh=_MESH.value, adapter=_ADAPTER.value)
  try:
    result = choices.score(model, items, batch_size=_BATCH.value)
  except ValueError as e:  # an item too long for the model, or one with nothing to score
    raise common.CommandError(f"--choices: {e}") from None
  print(json.dumps({k: result[k] for k in ("acc", "acc_norm", "n")}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
