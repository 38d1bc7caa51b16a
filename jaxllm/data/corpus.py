"""Text corpora: which documents exist, how to read one, and the held-out split.

A corpus is a list of `DocRef`s, cheap references that the grain pipeline reads lazily. The
default corpus is the running Python's standard library (`.py` files below `sysconfig`'s stdlib
path, without test suites and site-packages). User corpora are `.txt`/`.py`/`.md` files (one
document each) and `.jsonl` files (one document per line, in its "text" field), given as paths,
directories or globs. The held-out split is by file, decided by a hash of the file's path, so it
is stable across runs and machines; a corpus too small to split by file is split inside each
document instead (its last lines are held out); `eval_paths` names held-out files instead. A
mixture (`build_mixture`) is several named corpora, each with its weight.

Text is UTF-8. A file (or a JSONL record) that does not decode is never altered silently: by
default it is left out and named in `Corpus.undecodable`; `undecodable="replace"` keeps it with
each bad byte sequence read as U+FFFD, and names it there too.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig
import zlib

from jaxllm.config import UNDECODABLE
from jaxllm.errors import UserError

TEXT_SUFFIXES = (".txt", ".py", ".md")
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(UserError, ValueError):
  """The corpus is missing, empty or unreadable; the message says which."""


@dataclasses.dataclass(frozen=True)
class DocRef:
  """One document: a whole text file, one line of a .jsonl file, or a line range of a text file."""
  path: str
  jsonl_offset: int = -1  # byte offset of the line in a .jsonl file, -1 for text files
  line_start: int = 0  # [line_start, line_end) of a text file, line_end -1 = to the end
  line_end: int = -1
  # A JSONL record's "difficulty" (a reference model's loss: `jaxllm.eval --scores_out`).
  difficulty: float | None = None
  # How the document's bytes decode: "strict" (it was checked to be UTF-8 when listed), or
  # "replace" (it is not, and was kept with undecodable="replace").
  errors: str = "strict"


@dataclasses.dataclass(frozen=True)
class Corpus:
  train: tuple[DocRef, ...]
  eval: tuple[DocRef, ...]
  # Files and JSONL records (`path:line`) that are not UTF-8: left out, or kept with U+FFFD
  # (`undecodable="replace"`).
  undecodable: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Documents:
  """Documents, and the parts of their files that are not UTF-8 (a text file's path, or
  `path:line` for a JSONL record)."""
  docs: list[DocRef]
  undecodable: list[str]


@dataclasses.dataclass(frozen=True)
class Source:
  """One named source of a mixture: its training documents and its normalised weight."""
  name: str
  weight: float
  train: tuple[DocRef, ...]


def stdlib_files() -> list[str]:
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
    files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
  return files


def expand_paths(patterns: tuple[str, ...] | list[str]) -> list[str]:
  """Files named by paths, directories (searched recursively) and globs; sorted, unique."""
  files: set[str] = set()
  for pattern in patterns:
    matches = glob.glob(os.path.expanduser(pattern), recursive=True)
    if not matches:
      raise CorpusError(f"data.paths entry {pattern!r} matches no file")
    for match in matches:
      if os.path.isdir(match):
        for dirpath, _, filenames in os.walk(match):
          files.update(os.path.join(dirpath, f) for f in filenames
                       if f.endswith(TEXT_SUFFIXES + (".jsonl",)))
      else:
        files.add(match)
  return sorted(files)


def read_document(ref: DocRef) -> str:
  """The text of one document (bad bytes as U+FFFD only if it was kept with "replace")."""
  try:
    if ref.jsonl_offset >= 0:
      with open(ref.path, "rb") as f:
        f.seek(ref.jsonl_offset)
        record = json.loads(f.readline().decode("utf-8", ref.errors))
      return record["text"] if isinstance(record, dict) else str(record)
    with open(ref.path, encoding="utf-8", errors=ref.errors) as f:
      text = f.read()
  except OSError as e:  # e.g. deleted or made unreadable since the corpus was listed
    raise CorpusError(f"cannot read {ref.path}: {e.strerror}") from None
  except UnicodeDecodeError:
    raise CorpusError(f"{ref.path} is no longer UTF-8 text (changed since the corpus was "
                      "listed)") from None
  if ref.line_start == 0 and ref.line_end == -1:
    return text
  lines = text.splitlines(keepends=True)
  return "".join(lines[ref.line_start:None if ref.line_end == -1 else ref.line_end])


def _check_undecodable(undecodable: str) -> None:
  if undecodable not in UNDECODABLE:
    raise CorpusError(f"undecodable={undecodable!r} is not one of {', '.join(UNDECODABLE)}")


def _jsonl_docs(path: str, undecodable: str) -> Documents:
  docs, bad, offset = [], [], 0
  with open(path, "rb") as f:
    for number, line in enumerate(f, 1):
      if line.strip():
        errors = "strict"
        try:
          text = line.decode("utf-8")
        except UnicodeDecodeError:
          bad.append(f"{path}:{number}")
          if undecodable == "skip":
            offset += len(line)
            continue
          errors, text = "replace", line.decode("utf-8", "replace")
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise CorpusError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if isinstance(record, dict) and not isinstance(record.get("text"), str):
          raise CorpusError(f"{path}:{number}: JSON object has no string field 'text'")
        difficulty = record.get("difficulty") if isinstance(record, dict) else None
        if difficulty is not None and not isinstance(difficulty, (int, float)):
          raise CorpusError(f"{path}:{number}: field 'difficulty' is not a number")
        docs.append(DocRef(path, jsonl_offset=offset, errors=errors,
                           difficulty=None if difficulty is None else float(difficulty)))
      offset += len(line)
  return Documents(docs, bad)


def file_documents(path: str, undecodable: str = "skip") -> Documents:
  """The documents of one file: each record of a .jsonl file, or the whole text file (none if
  it is empty); parts that are not UTF-8 are left out or kept per `undecodable` and named.
  Raises CorpusError for malformed JSONL and OSError for unreadable files."""
  _check_undecodable(undecodable)
  if path.endswith(".jsonl"):
    return _jsonl_docs(path, undecodable)
  with open(path, "rb") as f:
    data = f.read()
  if not data:
    return Documents([], [])
  try:
    data.decode("utf-8")
  except UnicodeDecodeError:
    return Documents([] if undecodable == "skip" else [DocRef(path, errors="replace")],
                         [path])
  return Documents([DocRef(path)], [])


def _is_held_out(path: str, root: str, eval_fraction: float) -> bool:
  key = os.path.relpath(path, root).replace(os.sep, "/")
  return zlib.crc32(key.encode()) % 10_000 < eval_fraction * 10_000


def _files(paths) -> tuple[list[str], str]:
  """The files of `paths` (empty or "stdlib": the standard library) and the root their held-out
  hash is taken relative to."""
  if paths and list(paths) != ["stdlib"]:
    files = expand_paths(paths)
    return files, os.path.commonpath([os.path.abspath(f) for f in files]) if files else ""
  return stdlib_files(), sysconfig.get_paths()["stdlib"]


def _readable(files: list[str], undecodable: str,
              bad: list[str]) -> list[tuple[str, list[DocRef]]]:
  """The files' documents, file by file (files without any left out); the names of parts that
  are not UTF-8 are appended to `bad`."""
  readable = []
  for path in files:
    try:
      found = file_documents(path, undecodable)
    except OSError as e:
      raise CorpusError(f"cannot read {path}: {e.strerror}") from None
    bad.extend(found.undecodable)
    if found.docs:
      readable.append((path, found.docs))
  return readable


def build_corpus(paths: tuple[str, ...] | list[str], eval_fraction: float,
                 eval_paths: tuple[str, ...] | list[str] = (),
                 undecodable: str = "skip") -> Corpus:
  """Finds the documents and splits them into train and held-out sets: the files of
  `eval_paths` when given (and the rest train), else a stable hash of each file's path. Files
  and records that are not UTF-8 are left out or kept per `undecodable` (module docstring)."""
  _check_undecodable(undecodable)
  files, root = _files(paths)
  held_out_files = set()
  if eval_paths:
    held_out_files = {os.path.abspath(f) for f in expand_paths(eval_paths)}
  bad: list[str] = []
  readable = _readable([f for f in files if os.path.abspath(f) not in held_out_files],
                       undecodable, bad)
  if not readable:
    where = ", ".join(paths) if paths else sysconfig.get_paths()["stdlib"]
    skipped = f" ({len(bad)} not UTF-8, left out)" if bad else ""
    raise CorpusError(f"the corpus is empty: no non-empty text found in {where}"
                      + (" outside data.eval_paths" if eval_paths else "") + skipped)
  if eval_paths:
    held_out = [d for _, docs in _readable(sorted(held_out_files), undecodable, bad)
                for d in docs]
    if not held_out:
      raise CorpusError(f"data.eval_paths={','.join(eval_paths)} holds no non-empty text")
    return Corpus(tuple(d for _, docs in readable for d in docs), tuple(held_out), tuple(bad))
  train, held_out = [], []
  for path, docs in readable:
    (held_out if _is_held_out(os.path.abspath(path), root, eval_fraction) else train).extend(docs)
  if not train or not held_out:
    train, held_out = _split_inside_documents(readable, eval_fraction)
  return Corpus(tuple(train), tuple(held_out), tuple(bad))


def build_mixture(sources: dict[str, list[str]], weights: dict[str, float],
                  eval_fraction: float, eval_paths: tuple[str, ...] | list[str] = (),
                  undecodable: str = "skip") -> tuple[list[Source], Corpus]:
  """Each named source's training documents with its weight, and the corpus of them all: its
  `train` is every source's (the tokenizer learns from them), its `eval` the held-out files of
  `eval_paths`, or else each source's own held-out split, interleaved document by document so
  that a fixed number of evaluation batches covers every source."""
  mixture, held_out, bad = [], [], []
  for name, paths in sources.items():
    try:
      corpus = build_corpus(paths, eval_fraction, eval_paths, undecodable)
    except CorpusError as e:
      raise CorpusError(f"source {name!r}: {e}") from None
    mixture.append(Source(name, weights[name], corpus.train))
    held_out.append(corpus.eval)
    bad.extend(u for u in corpus.undecodable if u not in bad)
  if eval_paths:
    evaluation = held_out[0]
  else:
    longest = max(len(h) for h in held_out)
    evaluation = tuple(h[i] for i in range(longest) for h in held_out if i < len(h))
  train = tuple(d for s in mixture for d in s.train)
  return mixture, Corpus(train, evaluation, tuple(bad))


def _split_inside_documents(readable, eval_fraction):
  """Holds out the last lines of each text file (or the last records of each .jsonl file)."""
  train, held_out = [], []
  for path, docs in readable:
    if path.endswith(".jsonl"):
      cut = max(1, round(len(docs) * (1 - eval_fraction))) if len(docs) > 1 else len(docs)
      train.extend(docs[:cut])
      held_out.extend(docs[cut:])
      continue
    with open(path, encoding="utf-8", errors=docs[0].errors) as f:
      n_lines = len(f.read().splitlines())
    cut = min(n_lines - 1, max(1, round(n_lines * (1 - eval_fraction))))
    if cut < 1:
      train.extend(docs)
      continue
    train.append(dataclasses.replace(docs[0], line_start=0, line_end=cut))
    held_out.append(dataclasses.replace(docs[0], line_start=cut, line_end=-1))
  if not train or not held_out:
    raise CorpusError("the corpus is too small to hold out evaluation data "
                      "(give more files or longer documents)")
  return train, held_out
