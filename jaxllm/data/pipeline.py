"""grain input pipeline: documents -> tokens -> packed sequences -> batches.

Batches are dicts of numpy arrays, all `[batch, length]`:
  inputs       int32 token ids
  targets      int32 next-token ids
  weights      float32, 1 where the target belongs to the same document as the input
  segment_ids  int32, 1.. per packed document, 0 for padding
  positions    int32, position inside the document (restarts at each document)

Packing (`data.packing`): "concat" concatenates documents and splits them into rows of
`seq_len + 1` tokens (`grain.experimental.ConcatThenSplitIterDataset`), so no row is padding
except at the very end of a finite dataset, but most documents are cut at a row end; "best_fit"
places whole documents into the row they fit tightest (`grain.experimental.BestFitPackIterDataset`
over `packing_bins` rows at a time) and pads the rest, cutting only documents longer than a row.
A mixture (`data.sources` + `data.mixture`) packs each source on its own and interleaves rows
by weight (`packed_rows`).

Multi-process: every process runs the same global stream of `batch_size`-row batches and keeps
only its `rows` of each (the rows its devices hold). Batches and iterator state are then the same
whatever the number of processes, so a checkpoint written by N processes resumes on M. The price
is that each process tokenizes every document, which is small beside a training step.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Sequence

import grain
import numpy as np

from jaxllm.data import corpus as corpus_lib
from jaxllm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]


class _Tokenize:
  """`DocRef -> {'tokens': [bos] + ids + [eos]}` (a class so grain can pickle it)."""

  def __init__(self, tokenizer: Tokenizer):
    self._tokenizer = tokenizer

  def __call__(self, ref: corpus_lib.DocRef) -> dict[str, np.ndarray]:
    ids = self._tokenizer.encode(corpus_lib.read_document(ref))
    return {"tokens": np.asarray([self._tokenizer.bos_id, *ids, self._tokenizer.eos_id], np.int32)}


def _to_model_batch(packed: dict[str, np.ndarray]) -> Batch:
  tokens, seg, pos = packed["tokens"], packed["tokens_segment_ids"], packed["tokens_positions"]
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "weights": same_doc.astype(np.float32),
      "segment_ids": seg[:, :-1].astype(np.int32),
      "positions": pos[:, :-1].astype(np.int32),
  }


def _tuplify(x: Any) -> Any:
  if isinstance(x, dict):
    return {k: _tuplify(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuplify(v) for v in x)
  return x


class CheckpointableIterator:
  """A grain dataset iterator whose state is JSON bytes that survive a round trip.

  grain's packing iterator keeps tuples in its state and rejects the lists JSON gives back, so
  `set_state` turns lists into tuples. `jaxllm.checkpoint.orbax` stores the state once per
  checkpoint (it is the same in every process).
  """

  def __init__(self, iterator):
    self._iterator = iterator

  def __iter__(self) -> "CheckpointableIterator":
    return self

  def __next__(self) -> Batch:
    return next(self._iterator)

  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state(), indent=1).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(_tuplify(json.loads(state)))

  def close(self) -> None:
    """Stops the prefetch thread (otherwise it is stopped noisily at interpreter exit)."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


class _TakeRows:
  """`Batch -> Batch[start:stop]` (a class so grain can pickle it)."""

  def __init__(self, rows: tuple[int, int]):
    self._start, self._stop = rows

  def __call__(self, batch: Batch) -> Batch:
    return {k: v[self._start:self._stop] for k, v in batch.items()}


class _CutLongDocuments(grain.experimental.FlatMapTransform):
  """`{'tokens': [n]} -> pieces of at most `row` tokens`: best-fit packing places whole
  documents, and a document longer than a row fits none (a class so grain can pickle it)."""

  def __init__(self, row: int):
    self.row = row
    self.max_fan_out = 1  # unused by the iterator flat map; the base class asks for it

  def flat_map(self, element):
    tokens = element["tokens"]
    return [{"tokens": tokens[i:i + self.row]} for i in range(0, len(tokens), self.row)]


class _Label:
  """`row -> row + {'source': i}` (a class so grain can pickle it)."""

  def __init__(self, source: int):
    self._source = np.int32(source)

  def __call__(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**row, "source": self._source}


def _ordered(docs: Sequence[corpus_lib.DocRef], order: str, seed: int,
             shuffle: bool) -> grain.MapDataset:
  if order == "difficulty":
    unscored = sum(d.difficulty is None for d in docs)
    if unscored:
      raise corpus_lib.CorpusError(
          f"data.order=difficulty: {unscored} of {len(docs)} documents have no 'difficulty' "
          "(score them with python -m jaxllm.eval --scores_out=DIR)")
    # Easiest first; ties keep the corpus order (a stable sort).
    return grain.MapDataset.source(sorted(docs, key=lambda d: d.difficulty))
  ds = grain.MapDataset.source(list(docs))
  return ds.shuffle(seed=seed) if shuffle else ds


def read_options() -> grain.ReadOptions:
  """Tokenizing threads and prefetch buffer of each source, sized to this host's CPUs.

  grain's defaults (16 threads, 500 prefetched documents per source) cost a scan of the whole
  buffer on every document read: a 3-source mixture of short documents read 2000 rows in
  14.4 s with them and 4.0 s with these on a 2-core CPU."""
  threads = min(16, os.cpu_count() or 1)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=8 * threads)


def _source_rows(docs: Sequence[corpus_lib.DocRef], tokenizer: Tokenizer, *, seq_len: int,
                 seed: int, shuffle: bool, repeat: bool, packing: str, packing_bins: int,
                 order: str) -> grain.IterDataset:
  ds = _ordered(docs, order, seed, shuffle)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(_Tokenize(tokenizer)).to_iter_dataset(read_options())
  row = {"tokens": seq_len + 1}
  if packing == "best_fit":
    ds = grain.experimental.FlatMapIterDataset(ds, _CutLongDocuments(seq_len + 1))
    return grain.experimental.BestFitPackIterDataset(
        ds, length_struct=row, num_packing_bins=packing_bins, seed=seed, shuffle_bins=shuffle)
  if packing != "concat":
    raise ValueError(f"unknown packing {packing!r}")
  return grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=row)


def packed_rows(docs: Sequence[corpus_lib.DocRef] | Sequence[corpus_lib.Source],
                tokenizer: Tokenizer, *, seq_len: int, seed: int, shuffle: bool, repeat: bool,
                packing: str = "concat", packing_bins: int = 64,
                order: str = "shuffle") -> grain.IterDataset:
  """Packed rows `{'tokens', 'tokens_segment_ids', 'tokens_positions'}`, each `[seq_len + 1]`.

  `docs` is one list of documents, or a mixture: `corpus.Source`s, each packed on its own and
  their rows interleaved by grain in the proportions of their weights (grain's mix is
  deterministic and keeps every source's iterator state, so a resumed mixture continues
  exactly); mixed rows carry `'source'`, the index of theirs.
  """
  common = dict(tokenizer=tokenizer, seq_len=seq_len, shuffle=shuffle, repeat=repeat,
                packing=packing, packing_bins=packing_bins, order=order)
  if not docs or not isinstance(docs[0], corpus_lib.Source):
    return _source_rows(docs, seed=seed, **common)
  parts = [_source_rows(s.train, seed=seed + 1000 * i, **common).map(_Label(i))
           for i, s in enumerate(docs)]
  return grain.IterDataset.mix(parts, [s.weight for s in docs])


def packed_dataset(docs: Sequence[corpus_lib.DocRef] | Sequence[corpus_lib.Source],
                   tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                   shuffle: bool, repeat: bool, shuffle_window: int = 1024,
                   packing: str = "concat", packing_bins: int = 64,
                   order: str = "shuffle") -> grain.IterDataset:
  """Global batches of `batch_size` packed rows of `seq_len` tokens (`packed_rows`).

  With `shuffle`, documents are shuffled and then packed rows are shuffled again within a
  window of `shuffle_window` rows: a long file fills many consecutive rows, and without the
  second shuffle consecutive batches would all come from the same file. Under
  `order="difficulty"` documents are not shuffled, and the row window (shuffle_window rows)
  only blurs the curriculum locally.
  """
  ds = packed_rows(docs, tokenizer, seq_len=seq_len, seed=seed, shuffle=shuffle, repeat=repeat,
                   packing=packing, packing_bins=packing_bins, order=order)
  if shuffle:
    ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=shuffle_window,
                                                     seed=seed + 1)
  return ds.batch(batch_size, drop_remainder=repeat).map(_to_model_batch)


def packing_stats(docs: Sequence[corpus_lib.DocRef], tokenizer: Tokenizer, *, seq_len: int,
                  packing: str, packing_bins: int = 64) -> dict[str, float]:
  """One pass of `packing` over `docs` in corpus order: rows, the fraction of row tokens that
  are padding, and how many pieces the documents were cut into beyond one each."""
  rows = pieces = padding = 0
  for row in packed_rows(docs, tokenizer, seq_len=seq_len, seed=0, shuffle=False, repeat=False,
                         packing=packing, packing_bins=packing_bins):
    seg = row["tokens_segment_ids"]
    rows += 1
    padding += int(np.sum(seg == 0))
    pieces += len(np.unique(seg[seg > 0]))
  return {"packing": packing, "seq_len": seq_len, "rows": rows,
          "padding_fraction": padding / max(rows * (seq_len + 1), 1),
          "documents": len(docs), "cuts": pieces - len(docs)}


def split_rows(batch: Batch, length: int) -> Batch:
  """`[rows, T]` -> `[rows * T / length, length]`: each row cut into shorter ones (the
  sequence-length warm-up). Every (input, target) pair and its weight is kept; attention no
  longer crosses the cuts, and a document cut at one restarts its positions at 0 there, as a
  document continued onto a new packed row does."""
  rows, width = batch["inputs"].shape
  out = {k: v.reshape(rows * width // length, length) for k, v in batch.items()}
  seg, pos = out["segment_ids"], out["positions"]
  continued = (seg == seg[:, :1]) & (np.cumsum(seg != seg[:, :1], axis=1) == 0)
  out["positions"] = np.where(continued, pos - pos[:, :1], pos).astype(np.int32)
  return out


def train_iterator(docs, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                   rows: tuple[int, int] | None = None, packing: str = "concat",
                   packing_bins: int = 64, order: str = "shuffle") -> CheckpointableIterator:
  """An endless, shuffled, checkpointable iterator over this process's `rows` of each global
  batch of `batch_size` rows (all of them by default); `docs` as `packed_rows` takes them."""
  ds = packed_dataset(docs, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                      shuffle=True, repeat=True, packing=packing, packing_bins=packing_bins,
                      order=order)
  if rows is not None and rows != (0, batch_size):
    ds = ds.map(_TakeRows(rows))
  # A background thread tokenizes and packs the next batches while the device computes.
  ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=4)
  return CheckpointableIterator(iter(ds))


def eval_batches(docs, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                 rows: tuple[int, int] | None = None) -> list[Batch]:
  """The fixed held-out set: the first `num_batches` global batches (a short last one padded),
  this process's `rows` of each. Always concatenate-and-split, whatever training packs with, so
  that held-out losses compare across packings."""
  ds = packed_dataset(docs, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0,
                      shuffle=False, repeat=False)
  take = _TakeRows(rows or (0, batch_size))
  batches = []
  for batch in ds:
    if len(batches) == num_batches:
      break
    n = batch["inputs"].shape[0]
    if n < batch_size:  # keep one compiled shape: pad rows carry zero weight
      batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    batches.append(take(batch))
  if not batches:
    raise corpus_lib.CorpusError("the held-out split produced no evaluation tokens")
  return batches


def sentences_for_tokenizer(docs: Sequence[corpus_lib.DocRef], max_sentences: int) -> Iterator[str]:
  """Lines of the training documents, spread over all of them, for sentencepiece training."""
  total = 0
  # Visiting documents in a strided order spreads the sample when the corpus is larger than
  # `max_sentences` lines, without reading everything first.
  stride = 7 if len(docs) > 7 else 1
  order = [i for r in range(stride) for i in range(r, len(docs), stride)]
  for i in order:
    for line in corpus_lib.read_document(docs[i]).split("\n"):
      if line:
        yield line
        total += 1
        if total >= max_sentences:
          return
