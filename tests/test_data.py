"""Corpus discovery and split, tokenizer round trip, packing invariants, iterator resume."""

import json

import numpy as np
import pytest

from jaxllm.data import corpus as corpus_lib
from jaxllm.data import pipeline, tokenizer as tokenizer_lib


@pytest.fixture(scope="module")
def stdlib():
  return corpus_lib.build_corpus((), eval_fraction=0.05)


@pytest.fixture(scope="module")
def sp(stdlib):
  lines = pipeline.sentences_for_tokenizer(stdlib.train, 20_000)
  return tokenizer_lib.train_sentencepiece(lines, 512, max_sentences=20_000)


def test_stdlib_corpus_split_is_stable_and_disjoint(stdlib):
  again = corpus_lib.build_corpus((), eval_fraction=0.05)
  assert again == stdlib
  train_files = {d.path for d in stdlib.train}
  eval_files = {d.path for d in stdlib.eval}
  assert not train_files & eval_files
  assert len(stdlib.train) > 100 and len(stdlib.eval) > 5
  assert 0.02 < len(eval_files) / (len(train_files) + len(eval_files)) < 0.1
  assert not any("/test/" in p or "site-packages" in p for p in train_files)


def test_tokenizer_round_trips_held_out_text(sp, stdlib):
  assert sp.vocab_size == 512
  for ref in stdlib.eval[:20]:
    text = corpus_lib.read_document(ref)
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    assert len(ids) < len(text)  # it compresses
  odd = "tabs\tand  spaces\n\n  ünïcödé ✓ 中文 \r\n"
  assert sp.decode(sp.encode(odd)) == odd


def test_tokenizer_save_load(sp, tmp_path):
  sp.save(tmp_path / "t.model")
  again = tokenizer_lib.SentencePieceTokenizer(tmp_path / "t.model")
  assert again.encode("def f(x):\n    return x") == sp.encode("def f(x):\n    return x")
  assert (again.pad_id, again.bos_id, again.eos_id) == (0, 1, 2)


def test_packed_batches_are_consistent(sp, stdlib):
  it = pipeline.train_iterator(stdlib.train, sp, seq_len=64, batch_size=4, seed=0)
  for _ in range(5):
    b = next(it)
    for key in ("inputs", "targets", "weights", "segment_ids", "positions"):
      assert b[key].shape == (4, 64), key
    same = b["segment_ids"][:, 1:] == b["segment_ids"][:, :-1]
    # Inside a document the target is the next input; across a boundary it carries no weight.
    np.testing.assert_array_equal(np.where(same, b["targets"][:, :-1], 0),
                                  np.where(same, b["inputs"][:, 1:], 0))
    assert np.all(b["weights"][:, :-1][~same] == 0)
    # Positions restart at each new document and count up inside it.
    np.testing.assert_array_equal(b["positions"][:, 1:][same], b["positions"][:, :-1][same] + 1)
    assert b["weights"].mean() > 0.9  # packing leaves little waste
  it.close()


def test_iterator_resumes_exactly_from_json_state(sp, stdlib):
  it = pipeline.train_iterator(stdlib.train, sp, seq_len=32, batch_size=2, seed=3)
  for _ in range(7):
    next(it)
  state = it.get_state()
  json.loads(state)  # plain JSON bytes, as grain's orbax handler stores them
  expected = [next(it)["inputs"] for _ in range(5)]
  again = pipeline.train_iterator(stdlib.train, sp, seq_len=32, batch_size=2, seed=3)
  again.set_state(state)
  for want in expected:
    np.testing.assert_array_equal(next(again)["inputs"], want)
  it.close()
  again.close()


def test_eval_batches_are_fixed_and_padded(sp, stdlib):
  a = pipeline.eval_batches(stdlib.eval[:2], sp, seq_len=64, batch_size=4, num_batches=100)
  b = pipeline.eval_batches(stdlib.eval[:2], sp, seq_len=64, batch_size=4, num_batches=100)
  assert len(a) == len(b) and all(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))
  assert all(x["inputs"].shape == (4, 64) for x in a)


def test_user_files_txt_and_jsonl(tmp_path):
  for i in range(40):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i}\n" * 5)
  with open(tmp_path / "more.jsonl", "w") as f:
    for i in range(10):
      f.write(json.dumps({"text": f"record {i}"}) + "\n")
  corpus = corpus_lib.build_corpus((str(tmp_path),), eval_fraction=0.1)
  texts = [corpus_lib.read_document(r) for r in corpus.train + corpus.eval]
  assert "document 3\n" * 5 in texts and "record 7" in texts
  assert corpus.eval


def test_single_file_is_split_inside(tmp_path):
  path = tmp_path / "one.txt"
  path.write_text("".join(f"line {i}\n" for i in range(100)))
  corpus = corpus_lib.build_corpus((str(path),), eval_fraction=0.1)
  train = corpus_lib.read_document(corpus.train[0])
  held = corpus_lib.read_document(corpus.eval[0])
  assert train + held == path.read_text()
  assert held.startswith("line 90")


def test_corpus_errors_are_clear(tmp_path):
  with pytest.raises(corpus_lib.CorpusError, match="matches no file"):
    corpus_lib.build_corpus((str(tmp_path / "nothing*.txt"),), 0.1)
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(corpus_lib.CorpusError, match="the corpus is empty"):
    corpus_lib.build_corpus((str(tmp_path / "empty.txt"),), 0.1)
  (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
  with pytest.raises(corpus_lib.CorpusError, match="bad.jsonl:2: not valid JSON"):
    corpus_lib.build_corpus((str(tmp_path / "bad.jsonl"),), 0.1)


def test_a_vanished_document_is_a_clear_error(tmp_path):
  path = tmp_path / "gone.txt"
  path.write_text("x")
  ref = corpus_lib.DocRef(str(path))
  path.unlink()
  with pytest.raises(corpus_lib.CorpusError, match="cannot read .*gone.txt"):
    corpus_lib.read_document(ref)


def test_text_that_is_not_utf8_is_counted_and_never_altered_silently(tmp_path):
  for i in range(20):
    (tmp_path / f"doc{i}.txt").write_text(f"café {i}\n" * 3, encoding="utf-8")
  (tmp_path / "latin1.txt").write_bytes("café latin-1\n".encode("latin-1"))
  (tmp_path / "mixed.jsonl").write_bytes(b'{"text": "good one"}\n{"text": "bad \xff byte"}\n'
                                         b'{"text": "good two"}\n')
  bad = [str(tmp_path / "latin1.txt"), f"{tmp_path / 'mixed.jsonl'}:2"]

  def texts(corpus):
    return sorted(corpus_lib.read_document(r) for r in corpus.train + corpus.eval)

  skipped = corpus_lib.build_corpus((str(tmp_path),), eval_fraction=0.2)
  assert list(skipped.undecodable) == bad
  assert texts(skipped) == sorted([f"café {i}\n" * 3 for i in range(20)]
                                  + ["good one", "good two"])
  kept = corpus_lib.build_corpus((str(tmp_path),), eval_fraction=0.2, undecodable="replace")
  assert list(kept.undecodable) == bad
  assert texts(kept) == sorted(texts(skipped) + ["caf\ufffd latin-1\n", "bad \ufffd byte"])
  with pytest.raises(corpus_lib.CorpusError, match="undecodable='ignore' is not one of"):
    corpus_lib.build_corpus((str(tmp_path),), 0.2, undecodable="ignore")
  # A file checked as UTF-8 when listed and changed since is an error, not replaced text.
  ref = next(r for r in skipped.train if r.path.endswith("doc3.txt"))
  (tmp_path / "doc3.txt").write_bytes(b"\xff\xfe")
  with pytest.raises(corpus_lib.CorpusError, match="doc3.txt is no longer UTF-8 text"):
    corpus_lib.read_document(ref)


def test_a_corpus_that_fails_leaves_no_workdir(tmp_path):
  from jaxllm.train import loop
  from tests.helpers import tiny_experiment
  cfg = tiny_experiment(data=dict(paths=(str(tmp_path / "nothing*.txt"),)))
  with pytest.raises(corpus_lib.CorpusError, match="matches no file"):
    loop.train(cfg, str(tmp_path / "run"), progress=False)
  assert not (tmp_path / "run").exists()
