"""`python -m jaxllm.data prepare --data=GLOBS_OR_JSONL --out=DIR [options]`
`python -m jaxllm.data packing --data=GLOBS_OR_JSONL --tokenizer=MODEL [--seq_len=256,1024]`

prepare: deduplicates (exact and MinHash near duplicates) and filters (Gopher's heuristics) text
files and JSONL into sharded JSONL that `--config.data.paths=DIR` trains on, plus
`DIR/report.json` (`jaxllm.data.prepare`). `--dedup=none` and `--filters=none` turn either off.

`python -m jaxllm.data instructions --out=FILE.jsonl [--examples=400] [--seed=0]
[--format=chat|pairs|prompts] [--tasks=add,sort,...]`

instructions: synthetic one-turn chats with checkable answers (arithmetic, sorting, formatting,
extraction; `jaxllm.data.instructions`) for `python -m jaxllm.sft`, with --format=pairs their
prompt/chosen/rejected preference rows (`jaxllm.dpo`), with --format=prompts their prompts and
answers (`jaxllm.rl`'s exact_match reward reads "answer").

packing: packs the documents once in corpus order with each of `data.packing`'s modes and prints
one JSON line per mode and row length: rows, the padding fraction and the cuts made into
documents (`jaxllm.data.pipeline.packing_stats`).
"""

from __future__ import annotations

import json

from absl import app, flags

from jaxllm.cli import common

_DATA = flags.DEFINE_list("data", None, "Text files (.txt, .py, .md: one document each) and "
                         ".jsonl files (one document per line, field 'text'): paths, "
                         "directories or globs; `stdlib`: the Python standard library (the "
                         "training default's corpus).")
_OUT = flags.DEFINE_string("out", None, "prepare: output directory (shards and report.json).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "packing: a sentencepiece model (e.g. a "
                                 "training workdir's tokenizer.model).")
_SEQ_LEN = flags.DEFINE_list("seq_len", ["256"], "packing: row lengths to pack to.")
_PACKING_BINS = flags.DEFINE_integer("packing_bins", 64, "packing: best_fit rows filled at once "
                                     "(data.packing_bins).", lower_bound=1)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a complete earlier output.")
_DEDUP = flags.DEFINE_list("dedup", ["exact", "minhash"], "exact, minhash, or none.")
_MINHASH_THRESHOLD = flags.DEFINE_float(
    "minhash_threshold", 0.8, "Estimated Jaccard similarity of word n-gram sets at or above "
    "which a document is a near duplicate of a kept one.")
_MINHASH_NGRAM = flags.DEFINE_integer("minhash_ngram", 5, "Words per n-gram (shingle).")
_MINHASH_PERM = flags.DEFINE_integer("minhash_perm", 128, "MinHash permutations.")
_FILTERS = flags.DEFINE_list("filters", ["length", "mean_word_length", "symbols", "alpha",
                                         "repetition"],
                             "Quality filters (Gopher), applied in this order, or none.")
_MIN_WORDS = flags.DEFINE_integer("min_words", 50, "length: fewest words.")
_MAX_WORDS = flags.DEFINE_integer("max_words", 100_000, "length: most words.")
_MIN_MEAN = flags.DEFINE_float("min_mean_word_length", 3.0, "mean_word_length: lower bound.")
_MAX_MEAN = flags.DEFINE_float("max_mean_word_length", 10.0, "mean_word_length: upper bound.")
_MAX_SYMBOLS = flags.DEFINE_float("max_symbol_ratio", 0.1,
                                  "symbols: most ('#' + '...') per word.")
_MIN_ALPHA = flags.DEFINE_float("min_alpha_words", 0.8,
                                "alpha: least share of words with a letter.")
_MAX_DUP_LINES = flags.DEFINE_float("max_duplicate_lines", 0.3,
                                    "repetition: most share of lines repeating an earlier one.")
_MAX_TOP_NGRAM = flags.DEFINE_list(
    "max_top_ngram_fractions", ["0.20", "0.18", "0.16"],
    "repetition: most share of word characters in the most frequent 2-, 3- and 4-gram.")
_DOCS_PER_SHARD = flags.DEFINE_integer("docs_per_shard", 10_000, "Documents per output shard.")
_EXAMPLES = flags.DEFINE_integer("examples", 400, "instructions: rows to write.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "instructions: the generator's seed.")
_FORMAT = flags.DEFINE_enum("format", "chat", ["chat", "pairs", "prompts"], "instructions: "
                            "chat ({\"messages\"}), preference pairs ({\"messages\", "
                            "\"chosen\", \"rejected\"}) or prompts with their answers "
                            "({\"messages\", \"answer\"}, for jaxllm.rl).")
_TASKS = flags.DEFINE_list("tasks", None, "instructions: the tasks to draw from (default: all; "
                           "add, multiply, sort, upper, reverse_words, extract_year).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Processes computing signatures and filters.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_UNDECODABLE = flags.DEFINE_enum(
    "undecodable", "skip", ["skip", "replace"], "Files and JSONL records that are not UTF-8: "
    "leave them out, or keep them with each bad byte sequence as U+FFFD; counted in "
    "report.json either way.")
common.define_old_spelling("src", "data")


def _methods(values: list[str]) -> tuple[str, ...]:
  return () if values == ["none"] else tuple(values)


@common.one_line_errors
def main(argv):
  common.positional(argv, "command", ("prepare", "packing", "instructions"))
  if argv[1] != "instructions" and not _DATA.value:
    raise app.UsageError(f"{argv[1]} needs --data=GLOBS_OR_JSONL")
  if argv[1] == "packing":
    _packing()
    return
  if argv[1] == "instructions":
    _instructions()
    return
  if not _OUT.value:
    raise app.UsageError("prepare needs --out=DIR")
  from jaxllm.data import curate, prepare
  try:
    fractions = tuple(float(x) for x in _MAX_TOP_NGRAM.value)
  except ValueError:
    raise common.CommandError(f"--max_top_ngram_fractions={','.join(_MAX_TOP_NGRAM.value)} "
                              "takes three numbers") from None
  if len(fractions) != 3:
    raise common.CommandError("--max_top_ngram_fractions takes three numbers (2-, 3-, 4-grams)")
  thresholds = curate.Thresholds(
      min_words=_MIN_WORDS.value, max_words=_MAX_WORDS.value,
      min_mean_word_length=_MIN_MEAN.value, max_mean_word_length=_MAX_MEAN.value,
      max_symbol_ratio=_MAX_SYMBOLS.value, min_alpha_words=_MIN_ALPHA.value,
      max_duplicate_lines=_MAX_DUP_LINES.value, max_top_ngram_fractions=fractions)
  settings = prepare.Settings(
      dedup=_methods(_DEDUP.value), filters=_methods(_FILTERS.value), thresholds=thresholds,
      minhash_threshold=_MINHASH_THRESHOLD.value, minhash_ngram=_MINHASH_NGRAM.value,
      minhash_perm=_MINHASH_PERM.value, docs_per_shard=_DOCS_PER_SHARD.value,
      workers=_WORKERS.value)
  try:
    report = prepare.prepare(_DATA.value, _OUT.value, settings, overwrite=_OVERWRITE.value,
                             progress=_PROGRESS.value, undecodable=_UNDECODABLE.value)
  except prepare.PrepareError as e:
    raise common.CommandError(str(e)) from None
  summary = {k: report[k] for k in ("docs_in", "docs_out", "exact_duplicates",
                                    "near_duplicates", "removed_by_filter", "docs_per_s",
                                    "mb_per_s")}
  summary["undecodable"] = report["undecodable"]["count"]
  print(json.dumps(summary))


def _instructions() -> None:
  from jaxllm.data import instructions
  if not _OUT.value:
    raise app.UsageError("instructions needs --out=FILE.jsonl")
  make = {"chat": instructions.chats, "pairs": instructions.pairs,
          "prompts": instructions.prompts}[_FORMAT.value]
  tasks = tuple(_TASKS.value or instructions.TASKS)
  try:
    rows = make(_EXAMPLES.value, _SEED.value, tasks)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  instructions.write_jsonl(rows, _OUT.value)
  print(json.dumps({"out": _OUT.value, "examples": len(rows), "format": _FORMAT.value,
                    "tasks": list(tasks)}))


def _packing() -> None:
  from jaxllm.config import PACKINGS
  from jaxllm.data import pipeline, prepare, tokenizer
  if not _TOKENIZER.value:
    raise app.UsageError("packing needs --tokenizer=MODEL (a sentencepiece model)")
  try:
    lengths = [int(x) for x in _SEQ_LEN.value]
  except ValueError:
    raise common.CommandError(f"--seq_len={','.join(_SEQ_LEN.value)} takes integers") from None
  try:
    docs = prepare.list_documents(_DATA.value, _UNDECODABLE.value).docs
  except prepare.PrepareError as e:
    raise common.CommandError(str(e)) from None
  try:
    tok = tokenizer.SentencePieceTokenizer(_TOKENIZER.value)
  except (OSError, RuntimeError) as e:
    raise common.CommandError(f"--tokenizer={_TOKENIZER.value} cannot be loaded: {e}") from None
  for seq_len in lengths:
    for packing in PACKINGS:
      stats = pipeline.packing_stats(docs, tok, seq_len=seq_len, packing=packing,
                                     packing_bins=_PACKING_BINS.value)
      extra = {"packing_bins": _PACKING_BINS.value} if packing == "best_fit" else {}
      print(json.dumps({**stats, **extra}), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
