"""Mixtures of named sources, best-fit packing, the sequence-length warm-up's row split, the
difficulty order, explicit held-out files; and a training run using all of them that resumes
bitwise, with the per-document scores a reference model gives."""

import collections
import json
import os
import signal

import chex
import jax
import numpy as np
import pytest

from jaxllm import config as config_lib
from jaxllm.data import corpus as corpus_lib
from jaxllm.data import pipeline
from jaxllm.train import loop
from jaxllm.train.workdir import METRICS_FILE
from tests.helpers import tiny_experiment


class Chars:
  """One token per character (its code point); ids 1 and 2 are BOS and EOS."""
  bos_id, eos_id = 1, 2

  def encode(self, text):
    return [ord(c) for c in text]


def _jsonl(path, texts, **fields):
  with open(path, "w") as f:
    for i, t in enumerate(texts):
      f.write(json.dumps({"text": t, **{k: v[i] for k, v in fields.items()}}) + "\n")
  return corpus_lib.file_documents(str(path)).docs


def _texts(rng, letters, n, lo=3, hi=40):
  return ["".join(rng.choice(list(letters), rng.integers(lo, hi))) for _ in range(n)]


def _segments(row):
  """The token runs of each document piece in a packed row."""
  tokens, seg = row["tokens"], row["tokens_segment_ids"]
  return [tuple(tokens[seg == s].tolist()) for s in np.unique(seg[seg > 0])]


def test_mixture_rows_follow_the_weights_within_one_percent(tmp_path):
  rng = np.random.default_rng(0)
  letters = {"code": "abcdefgh", "docs": "ijklmnop", "web": "qrstuvwx"}
  weights = {"code": 0.5, "docs": 0.3, "web": 0.2}
  # Sources of very different sizes: the weights, not the sizes, set the shares.
  sources = [corpus_lib.Source(name, weights[name],
                               tuple(_jsonl(tmp_path / f"{name}.jsonl",
                                            _texts(rng, letters[name], n))))
             for name, n in (("code", 40), ("docs", 300), ("web", 7))]
  it = iter(pipeline.packed_rows(sources, Chars(), seq_len=31, seed=0, shuffle=True,
                                 repeat=True))
  counts = collections.Counter()
  for _ in range(10_000):
    row = next(it)
    name = sources[int(row["source"])].name
    counts[name] += 1
    body = {chr(t) for t in row["tokens"].tolist() if t > 2}
    assert body <= set(letters[name]), name  # every row holds its own source's text only
  for name, weight in weights.items():
    assert abs(counts[name] / 10_000 - weight) < 0.01, (name, counts)


def test_mixture_iterator_resumes_exactly(tmp_path):
  rng = np.random.default_rng(1)
  sources = [corpus_lib.Source("a", 0.7, tuple(_jsonl(tmp_path / "a.jsonl",
                                                      _texts(rng, "abc", 50)))),
             corpus_lib.Source("b", 0.3, tuple(_jsonl(tmp_path / "b.jsonl",
                                                      _texts(rng, "xyz", 20))))]
  for packing in config_lib.PACKINGS:
    make = lambda: pipeline.train_iterator(sources, Chars(), seq_len=16, batch_size=4, seed=5,
                                           packing=packing, packing_bins=8)
    it = make()
    for _ in range(9):
      next(it)
    state = it.get_state()
    want = [next(it) for _ in range(6)]
    again = make()
    again.set_state(state)
    for batch in want:
      chex.assert_trees_all_equal(next(again), batch)
    it.close()
    again.close()


def test_best_fit_keeps_documents_whole_and_reports_its_padding(tmp_path):
  rng = np.random.default_rng(2)
  texts = _texts(rng, "abcdefghij", 300, lo=1, hi=60) + ["k" * 150, "l" * 70]  # two too long
  docs = _jsonl(tmp_path / "d.jsonl", texts)
  row = 64  # seq_len 63
  tokenized = [[1, *map(ord, t), 2] for t in texts]
  pieces = [tuple(ids[i:i + row]) for ids in tokenized for i in range(0, len(ids), row)]
  rows = list(pipeline.packed_rows(docs, Chars(), seq_len=row - 1, seed=0, shuffle=False,
                                   repeat=False, packing="best_fit", packing_bins=16))
  got = [s for r in rows for s in _segments(r)]
  # Each document is one segment of one row, except the two longer than a row (3 + 2 pieces).
  assert sorted(got) == sorted(pieces)
  assert len(pieces) == len(texts) + 3
  for r in rows:  # positions count from 0 in every segment; padding is 0 with no segment
    seg, pos = r["tokens_segment_ids"], r["tokens_positions"]
    for s in np.unique(seg[seg > 0]):
      np.testing.assert_array_equal(pos[seg == s], np.arange(np.sum(seg == s)))
  best = pipeline.packing_stats(docs, Chars(), seq_len=row - 1, packing="best_fit",
                                packing_bins=16)
  concat = pipeline.packing_stats(docs, Chars(), seq_len=row - 1, packing="concat")
  padding = sum(int(np.sum(r["tokens_segment_ids"] == 0)) for r in rows)
  assert best["rows"] == len(rows) and best["cuts"] == 3
  assert best["padding_fraction"] == pytest.approx(padding / (len(rows) * row))
  total = sum(len(ids) for ids in tokenized)
  assert concat["rows"] == -(-total // row)  # concatenation pads only its last row
  assert concat["padding_fraction"] == pytest.approx(1 - total / (concat["rows"] * row))
  assert concat["cuts"] > best["cuts"]


def test_split_rows_keeps_every_pair_and_restarts_positions(tmp_path):
  rng = np.random.default_rng(3)
  docs = _jsonl(tmp_path / "d.jsonl", _texts(rng, "abcdef", 60, lo=1, hi=30))
  batch = next(iter(pipeline.packed_dataset(docs, Chars(), seq_len=32, batch_size=4, seed=0,
                                            shuffle=True, repeat=True)))
  short = pipeline.split_rows(batch, 8)
  for key in ("inputs", "targets", "weights", "segment_ids"):
    np.testing.assert_array_equal(short[key], batch[key].reshape(16, 8), key)
  for seg, pos in zip(short["segment_ids"], short["positions"]):
    want, last = [], None
    for s in seg:  # a reference count: position since the segment began in this row
      want.append(want[-1] + 1 if s == last and s > 0 else 0)
      last = s
    np.testing.assert_array_equal(pos, want)
  assert not np.array_equal(short["positions"], batch["positions"].reshape(16, 8))


def test_difficulty_order_visits_the_easiest_documents_first(tmp_path):
  rng = np.random.default_rng(4)
  texts = [f"{i:03d}" + "".join(rng.choice(list("abc"), 5)) for i in range(40)]
  difficulty = rng.permutation(40).astype(float).tolist()
  docs = _jsonl(tmp_path / "d.jsonl", texts, difficulty=difficulty)
  assert [d.difficulty for d in docs] == difficulty
  rows = pipeline.packed_rows(docs, Chars(), seq_len=400, seed=0, shuffle=True, repeat=False,
                              order="difficulty")
  seen = [int("".join(map(chr, s[1:4]))) for s in _segments(next(iter(rows)))]
  assert [difficulty[i] for i in seen] == sorted(difficulty)
  unscored = _jsonl(tmp_path / "u.jsonl", texts)
  with pytest.raises(corpus_lib.CorpusError, match="40 of 40 documents have no 'difficulty'"):
    pipeline.packed_rows(unscored, Chars(), seq_len=64, seed=0, shuffle=True, repeat=True,
                         order="difficulty")


def test_explicit_held_out_files_and_interleaved_source_evaluation(tmp_path):
  for name in ("a", "b"):
    os.makedirs(tmp_path / name)
    for i in range(6):
      (tmp_path / name / f"{i}.txt").write_text(f"{name} file {i}\n" * 3)
  held = [str(tmp_path / "a" / "0.txt"), str(tmp_path / "b" / "5.txt")]
  corpus = corpus_lib.build_corpus([str(tmp_path)], 0.5, eval_paths=held)
  assert sorted(d.path for d in corpus.eval) == sorted(held)
  assert len(corpus.train) == 10 and not {d.path for d in corpus.train} & set(held)
  sources, mixed = corpus_lib.build_mixture(
      {"a": [str(tmp_path / "a")], "b": [str(tmp_path / "b")]}, {"a": 0.5, "b": 0.5}, 0.5)
  owners = [os.path.basename(os.path.dirname(d.path)) for d in mixed.eval]
  assert owners[:2] in (["a", "b"], ["b", "a"])  # each source's held-out files alternate
  assert set(mixed.train) == {d for s in sources for d in s.train}
  with pytest.raises(corpus_lib.CorpusError, match="source 'c': data.paths entry"):
    corpus_lib.build_mixture({"c": [str(tmp_path / "nope")]}, {"c": 1.0}, 0.5)


def _metrics(workdir):
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
  """A mixture of two stdlib slices (short package __init__ files, which leave best-fit
  padding, and the email package), best-fit packed, with a sequence-length warm-up: trained
  straight, and again preempted at step 7 (inside the warm-up) and resumed."""
  root = tmp_path_factory.mktemp("curriculum")
  stdlib = corpus_lib.stdlib_files()
  short = [p for p in stdlib if p.endswith("__init__.py") and 0 < os.path.getsize(p) < 1000]
  latin1 = root / "latin1.py"  # not UTF-8: left out of the run, and counted
  latin1.write_bytes("# café\n".encode("latin-1"))
  short.append(str(latin1))
  cfg = tiny_experiment(
      data=dict(sources=",".join([f"init={p}" for p in short]
                                 + [f"email={p}" for p in stdlib if "/email/" in p]),
                mixture="init:0.5,email:0.5", packing="best_fit", packing_bins=16),
      train=dict(steps=12, seq_len_schedule="8:5,16:9", checkpoint_every=100, eval_every=12))
  straight = loop.train(cfg, str(root / "straight"), progress=False)

  def preempt(step):
    if step == 7:
      signal.raise_signal(signal.SIGTERM)

  first = loop.train(cfg, str(root / "resumed"), progress=False, on_step=preempt)
  resumed = loop.train(cfg, str(root / "resumed"), progress=False)
  return cfg, root, straight, first, resumed


def test_mixture_with_warm_up_and_best_fit_trains_and_resumes_bitwise(curriculum):
  cfg, root, straight, first, resumed = curriculum
  assert first["checkpoint_step"] == 7 and resumed["step"] == 12
  assert straight["undecodable"] == 1
  rows = [r for r in _metrics(root / "straight") if "loss" in r]
  assert [r["seq_len"] for r in rows] == [8] * 4 + [16] * 4 + [32] * 4
  padding = [r["padding"] for r in rows]  # best-fit pads the tails of documents, a little
  assert min(padding) >= 0 and 0 < np.mean(padding) < 0.5, padding
  again = {r["step"]: r["loss"] for r in _metrics(root / "resumed") if "loss" in r}
  assert again == {r["step"]: r["loss"] for r in rows}
  chex.assert_trees_all_equal(jax.device_get(resumed["params"]),
                              jax.device_get(straight["params"]))
  changed = config_lib.from_config_dict({**cfg.to_dict(), "data": {
      **cfg.to_dict()["data"], "packing": "concat"}})
  with pytest.raises(config_lib.ConfigError, match="data.packing 'concat' differs"):
    loop.train(changed, str(root / "resumed"), progress=False)


def test_reference_scores_are_per_document_losses_written_as_difficulty(curriculum, tmp_path):
  import jaxllm
  from jaxllm.eval import scores_out, scoring
  from jaxllm.data import prepare
  _, root, *_ = curriculum
  model = jaxllm.load(str(root / "straight"))
  texts = ["def f(x):\n    return x + 1\n", "import os\n" * 30, "Z", "class A:\n    pass\n"]
  docs = _jsonl(tmp_path / "d.jsonl", texts, source=["s0", "s1", "s2", "s3"])
  nll, tokens = scoring.score_texts(model, texts, max_len=32, stride=16, batch_size=3,
                                     progress=False)
  for text, n, t in zip(texts, nll, tokens):  # a reference: one forward pass per document
    ids = model.prompt_ids(text)
    if len(ids) > 32:
      continue  # the windowed case is eval's own test; this one checks the per-row split
    logits = np.asarray(model.logits(np.asarray([ids]))[0], np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                           keepdims=True)) - logits.max(-1, keepdims=True)
    want = -sum(logp[j, ids[j + 1]] for j in range(len(ids) - 1))
    assert t == len(ids) - 1 and n == pytest.approx(want, rel=1e-4)
  prepare.open_output(str(tmp_path / "scored"), overwrite=False)
  scores_out.write_scores(str(tmp_path / "scored"), docs, texts, nll, tokens, {}, progress=False)
  scored = corpus_lib.build_corpus([str(tmp_path / "scored" / "*.jsonl")], 0.1,
                                   eval_paths=[str(tmp_path / "d.jsonl")]).train
  by_text = {corpus_lib.read_document(d): d.difficulty for d in scored}
  for text, n, t in zip(texts, nll, tokens):
    assert by_text[text] == pytest.approx(n / max(t, 1), abs=1e-5)
  with open(scored[0].path) as f:
    assert json.loads(f.readline())["source"] == "s0"  # other fields are kept


def test_packing_and_scoring_commands(curriculum, tmp_path):
  import subprocess
  import sys

  from jaxllm.data import tokenizer as tokenizer_lib
  from jaxllm.eval import scoring
  _, root, *_ = curriculum
  run = lambda module, *args: subprocess.run([sys.executable, "-m", module, *args],
                                             capture_output=True, text=True, timeout=300)
  texts = [f"def f{i}(x):\n    return x * {i}\n" * (1 + i % 4) for i in range(12)]
  docs = _jsonl(tmp_path / "d.jsonl", texts)
  tok_path = str(root / "straight" / "tokenizer.model")
  out = run("jaxllm.data", "packing", f"--data={tmp_path / 'd.jsonl'}", f"--tokenizer={tok_path}",
            "--seq_len=16", "--packing_bins=4")
  assert out.returncode == 0, out.stderr
  printed = [json.loads(line) for line in out.stdout.strip().splitlines()]
  tok = tokenizer_lib.SentencePieceTokenizer(tok_path)
  for line, packing in zip(printed, config_lib.PACKINGS):
    want = pipeline.packing_stats(docs, tok, seq_len=16, packing=packing, packing_bins=4)
    assert {k: line[k] for k in want} == want
  (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))  # not UTF-8: not scored
  scored = run("jaxllm.eval", f"--checkpoint={root / 'straight'}",
               f"--data={tmp_path / 'd.jsonl'},{tmp_path / 'latin1.txt'}", "--max_seq_len=32",
               f"--scores_out={tmp_path / 'scored'}", "--noprogress")
  assert scored.returncode == 0, scored.stderr
  assert json.loads(scored.stdout.strip().splitlines()[-1])["undecodable"] == 1
  assert "1 of --data's files or records are not UTF-8" in scored.stderr
  with open(tmp_path / "scored" / "report.json") as f:
    assert json.load(f)["docs"] == 12
  import jaxllm
  nll, tokens = scoring.score_texts(jaxllm.load(str(root / "straight")), texts, max_len=32,
                                     stride=16, batch_size=4, progress=False)
  got = corpus_lib.file_documents(str(tmp_path / "scored" / "shard-00000-of-00001.jsonl")).docs
  np.testing.assert_allclose([d.difficulty for d in got], nll / tokens, atol=1e-4)
  again = run("jaxllm.eval", f"--checkpoint={root / 'straight'}", f"--data={tmp_path / 'd.jsonl'}",
              f"--scores_out={tmp_path / 'scored'}")
  assert again.returncode == 2 and "--scores_out=" in again.stderr and "--overwrite" in again.stderr
