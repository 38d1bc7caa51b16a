"""`prepare`: raw text files and JSONL -> deduplicated, filtered, sharded JSONL + report.json.

Three passes over the documents, in input order:
  1. per document (in `workers` processes): its exact key, the first quality filter it fails,
     and its MinHash signature (`jaxllm.data.curate`);
  2. in order, one process: a document whose exact key was seen is an exact duplicate; one that
     fails a filter is removed by it; one whose signature matches a kept document's (an LSH
     candidate whose estimated Jaccard similarity is >= the threshold) is a near duplicate; the
     rest are kept, their signatures entered in the LSH index;
  3. the kept documents are read again and written as `shard-NNNNN-of-MMMMM.jsonl` records
     `{"text", "source"}`, which `data.paths` reads like any JSONL corpus.
The shards are written under `OUT/.incomplete/` and moved into OUT only when all are written;
`report.json`, written last, marks OUT complete; `.prepare-running`, present from a run's start
until then, marks it as ours. A run that finds an interrupted one's OUT deletes what it left
(staged and moved shards) and starts again; a complete OUT is refused unless `overwrite`, and
any other non-empty directory is refused untouched.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from typing import Iterable

import numpy as np
from tqdm import tqdm

from jaxllm.config import UNDECODABLE
from jaxllm.data import corpus as corpus_lib
from jaxllm.data import curate

REPORT = "report.json"
_INCOMPLETE = ".incomplete"
_RUNNING = ".prepare-running"  # present from a run's start until its report is written
DEDUP_METHODS = ("exact", "minhash")


class PrepareError(ValueError):
  """Bad settings or an output directory that cannot be written; the message says which."""


@dataclasses.dataclass(frozen=True)
class Settings:
  dedup: tuple[str, ...] = DEDUP_METHODS
  filters: tuple[str, ...] = curate.FILTERS
  thresholds: curate.Thresholds = curate.Thresholds()
  minhash_threshold: float = 0.8
  minhash_ngram: int = 5
  minhash_perm: int = 128
  docs_per_shard: int = 10_000
  workers: int = 1
  clusters: int = 20  # how many of the largest duplicate clusters the report names

  def check(self) -> None:
    bad = set(self.dedup) - set(DEDUP_METHODS)
    if bad:
      raise PrepareError(f"--dedup={','.join(sorted(bad))} is not one of "
                         f"{', '.join(DEDUP_METHODS)} (or none)")
    bad = set(self.filters) - set(curate.FILTERS)
    if bad:
      raise PrepareError(f"--filters={','.join(sorted(bad))} is not one of "
                         f"{', '.join(curate.FILTERS)} (or none)")
    if not 0 < self.minhash_threshold <= 1:
      raise PrepareError(f"--minhash_threshold={self.minhash_threshold} must be in (0, 1]")
    if self.minhash_ngram < 1 or self.minhash_perm < 16 or self.docs_per_shard < 1 or (
        self.workers < 1):
      raise PrepareError("--minhash_ngram, --docs_per_shard and --workers must be >= 1 and "
                         "--minhash_perm >= 16")


def list_documents(sources: Iterable[str], undecodable: str = "skip") -> corpus_lib.Documents:
  """Every document of the files the sources (paths, directories, globs; `stdlib`: the running
  Python's standard library, as training's default corpus has it) name, in order, and the parts
  that are not UTF-8 (left out, or kept with U+FFFD: `undecodable` "skip" or "replace")."""
  if undecodable not in UNDECODABLE:
    raise PrepareError(f"--undecodable={undecodable} is not one of {', '.join(UNDECODABLE)}")
  docs, bad = [], []
  sources = list(sources)
  files = corpus_lib.expand_paths([s for s in sources if s != "stdlib"]) if any(
      s != "stdlib" for s in sources) else []
  if "stdlib" in sources:
    files = corpus_lib.stdlib_files() + files
  for path in files:
    try:
      found = corpus_lib.file_documents(path, undecodable)
    except OSError as e:
      raise PrepareError(f"cannot read {path}: {e.strerror}") from None
    docs.extend(found.docs)
    bad.extend(found.undecodable)
  if not docs:
    skipped = f" ({len(bad)} not UTF-8, left out)" if bad else ""
    raise PrepareError(f"no documents in {', '.join(sources)}{skipped}")
  return corpus_lib.Documents(docs, bad)


def _features(args):
  """Pass 1 for one document: (bytes, exact key, failed filter, signature or None)."""
  ref, settings = args
  text = corpus_lib.read_document(ref)
  signature = None
  if "minhash" in settings.dedup:
    signature = curate.minhash_signature(text, ngram=settings.minhash_ngram,
                                         num_perm=settings.minhash_perm)
  return (len(text.encode("utf-8")), curate.exact_key(text),
          curate.failed_filter(text, settings.filters, settings.thresholds), signature)


def _name(ref: corpus_lib.DocRef, root: str) -> str:
  rel = os.path.relpath(ref.path, root) if root else ref.path
  return f"{rel}@{ref.jsonl_offset}" if ref.jsonl_offset >= 0 else rel


def open_output(out: str, overwrite: bool) -> None:
  """Makes OUT ready for a fresh run: refuses a complete one unless `overwrite`, deletes what an
  interrupted run of ours left (it is marked by `_RUNNING`), and refuses any other non-empty
  directory, whose files are not ours to delete."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise PrepareError(f"--out={out} exists and is not a directory")
  os.makedirs(out, exist_ok=True)
  ours = os.path.exists(os.path.join(out, REPORT)) or os.path.exists(os.path.join(out, _RUNNING))
  if os.path.exists(os.path.join(out, REPORT)) and not overwrite:
    raise PrepareError(f"--out={out} already holds a prepared corpus ({REPORT}); pass "
                       "--overwrite to replace it")
  if not ours and os.listdir(out):
    raise PrepareError(f"--out={out} is not empty and was not written by prepare (nothing "
                       "deleted)")
  with open(os.path.join(out, _RUNNING), "w"):
    pass  # from here on OUT is incomplete, and ours to clean
  if os.path.exists(os.path.join(out, REPORT)):
    os.remove(os.path.join(out, REPORT))
  shutil.rmtree(os.path.join(out, _INCOMPLETE), ignore_errors=True)
  for name in os.listdir(out):
    if name.startswith("shard-") and name.endswith(".jsonl"):
      os.remove(os.path.join(out, name))


def prepare(sources: Iterable[str], out: str, settings: Settings = Settings(), *,
            overwrite: bool = False, progress: bool = True, undecodable: str = "skip") -> dict:
  """Runs the three passes (module docstring) and returns the report it writes. Files and
  JSONL records that are not UTF-8 are left out (or kept with U+FFFD: `undecodable="replace"`)
  and counted in the report."""
  settings.check()
  sources = list(sources)
  listed = list_documents(sources, undecodable)
  docs = listed.docs
  open_output(out, overwrite)
  start = time.perf_counter()
  root = os.path.commonpath([os.path.abspath(d.path) for d in docs])
  root = root if os.path.isdir(root) else os.path.dirname(root)
  bar = lambda it, what: tqdm(it, total=len(docs), desc=what, unit="doc", disable=not progress)

  # Pass 1, in parallel; results come back in input order.
  work = ((d, settings) for d in docs)
  if settings.workers > 1:
    with multiprocessing.get_context("spawn").Pool(settings.workers) as pool:
      features = list(bar(pool.imap(_features, work, chunksize=16), "features"))
  else:
    features = list(bar(map(_features, work), "features"))

  # Pass 2, in order.
  lsh = None
  if "minhash" in settings.dedup:
    from datasketch import MinHashLSH
    # Banding tuned to miss few pairs at the threshold (weights: false positives 0.05, false
    # negatives 0.95; at 128 permutations a 0.8-similar pair is a candidate with p = 0.95, a
    # 0.85 one with 0.99); the signatures' own estimate then confirms each candidate.
    lsh = MinHashLSH(threshold=settings.minhash_threshold, num_perm=settings.minhash_perm,
                     weights=(0.05, 0.95))
  seen: dict[bytes, int] = {}
  signatures: dict[int, np.ndarray] = {}
  cluster: dict[int, list[int]] = {}  # kept document -> the duplicates removed for it
  removed = dict.fromkeys(settings.filters, 0)
  kept, exact, near = [], 0, 0
  for i, (_, key, failed, signature) in enumerate(features):
    if "exact" in settings.dedup and key in seen:
      exact += 1
      cluster.setdefault(seen[key], []).append(i)
      continue
    seen.setdefault(key, i)
    if failed is not None:
      removed[failed] += 1
      continue
    if lsh is not None:
      match = _near_match(lsh, signatures, signature, settings.minhash_threshold)
      if match is not None:
        near += 1
        cluster.setdefault(match, []).append(i)
        continue
      lsh.insert(str(i), curate.lean_minhash(signature))
      signatures[i] = signature
    kept.append(i)

  # Pass 3.
  records = ({"text": corpus_lib.read_document(docs[i]), "source": _name(docs[i], root)}
             for i in kept)
  bytes_out = write_shards(out, records, len(kept), settings.docs_per_shard, progress)
  seconds = time.perf_counter() - start
  bytes_in = sum(f[0] for f in features)
  largest = sorted(cluster.items(), key=lambda kv: -len(kv[1]))[:settings.clusters]
  report = {
      "docs_in": len(docs), "docs_out": len(kept), "bytes_in": bytes_in, "bytes_out": bytes_out,
      "exact_duplicates": exact, "near_duplicates": near,
      "clusters": [{"kept": _name(docs[k], root), "size": len(v) + 1,
                    "removed": [_name(docs[j], root) for j in v[:10]]} for k, v in largest],
      "removed_by_filter": removed,
      # Not UTF-8: how many files and JSONL records, the first of them, and what was done.
      "undecodable": {"count": len(listed.undecodable), "action": undecodable,
                      "first": listed.undecodable[:10]},
      "seconds": round(seconds, 3), "docs_per_s": round(len(docs) / seconds, 1),
      "mb_per_s": round(bytes_in / 1e6 / seconds, 3),
      "sources": sources,
      "settings": {**dataclasses.asdict(settings),
                   "thresholds": dataclasses.asdict(settings.thresholds)},
  }
  finish_output(out, report)
  return report


def finish_output(out: str, report: dict) -> None:
  """Writes `report.json`, which marks OUT complete, and drops the running marker."""
  tmp = os.path.join(out, REPORT + ".tmp")
  with open(tmp, "w") as f:
    json.dump(report, f, indent=2)
  os.replace(tmp, os.path.join(out, REPORT))
  os.remove(os.path.join(out, _RUNNING))


def _near_match(lsh, signatures: dict[int, np.ndarray], signature: np.ndarray,
                threshold: float) -> int | None:
  """The earliest kept document whose signature agrees with `signature` on at least
  `threshold` of its permutations (the MinHash estimate of their Jaccard similarity), among the
  LSH candidates; None if none does."""
  best = None
  for key in lsh.query(curate.lean_minhash(signature)):
    j = int(key)
    if np.mean(signatures[j] == signature) >= threshold and (best is None or j < best):
      best = j
  return best


def write_shards(out: str, records: Iterable[dict], n_records: int, per_shard: int,
                 progress: bool) -> int:
  """Writes `n_records` JSONL records (each with a "text") under OUT/.incomplete, then moves
  the shards into OUT; returns the bytes of text written. OUT was made ready by
  `open_output`."""
  staging = os.path.join(out, _INCOMPLETE)
  os.makedirs(staging)
  n_shards = max(1, -(-n_records // per_shard))
  names = [f"shard-{s:05d}-of-{n_shards:05d}.jsonl" for s in range(n_shards)]
  records = iter(records)
  written = 0
  with tqdm(total=n_records, desc="write", unit="doc", disable=not progress) as bar:
    for s, name in enumerate(names):
      with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
        for _ in range(min(per_shard, n_records - s * per_shard)):
          record = next(records)
          written += len(record["text"].encode("utf-8"))
          f.write(json.dumps(record, ensure_ascii=False))
          f.write("\n")
          bar.update()
  for name in names:
    os.replace(os.path.join(staging, name), os.path.join(out, name))
  os.rmdir(staging)
  return written
