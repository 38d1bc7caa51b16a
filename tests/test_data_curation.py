"""`python -m jaxllm.data prepare`: exact and near-duplicate removal against planted duplicates,
each quality filter on hand-made cases, the output as a corpus, clean restarts, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.data import corpus as corpus_lib
from jaxllm.data import curate, prepare

NO_FILTERS = prepare.Settings(filters=())


def _words(rng, n, vocab=3000):
  return [f"w{int(i)}" for i in rng.integers(0, vocab, n)]


def _write_jsonl(path, texts):
  with open(path, "w") as f:
    for t in texts:
      f.write(json.dumps({"text": t}) + "\n")


def test_exact_duplicates_are_all_found_through_case_and_spacing(tmp_path):
  rng = np.random.default_rng(0)
  base = [" ".join(_words(rng, 80)) for _ in range(30)]
  copies = [base[i].upper() if i % 2 else "  " + base[i].replace(" ", "\n  ") + "\n"
            for i in rng.integers(0, 30, 20)]
  _write_jsonl(tmp_path / "a.jsonl", base + copies)
  report = prepare.prepare([str(tmp_path / "a.jsonl")], str(tmp_path / "out"),
                           prepare.Settings(dedup=("exact",), filters=()), progress=False)
  assert report["exact_duplicates"] == 20 and report["near_duplicates"] == 0
  assert report["docs_out"] == 30
  assert sum(c["size"] - 1 for c in report["clusters"]) == 20


def test_near_duplicates_at_jaccard_0_8_with_recall_and_precision_over_0_95(tmp_path):
  """Near copies (1-3 words replaced: Jaccard >= 0.85 over word 5-grams) must go; variants
  just below the threshold (7-10 replaced: Jaccard 0.59-0.70, which LSH often proposes) and
  distant ones (16-30 replaced) must stay. Scored against the exact Jaccard of the texts."""
  rng = np.random.default_rng(1)
  base = [_words(rng, 200) for _ in range(200)]
  docs = [" ".join(w) for w in base]
  for i in range(600):
    words = list(base[i % 200])
    k = int(rng.integers(*((1, 4), (7, 11), (16, 31))[i // 200]))
    for j in rng.choice(len(words), k, replace=False):
      words[j] = f"x{int(rng.integers(0, 10 ** 6))}"
    docs.append(" ".join(words))
  _write_jsonl(tmp_path / "c.jsonl", docs)
  report = prepare.prepare([str(tmp_path / "c.jsonl")], str(tmp_path / "out"),
                           prepare.Settings(dedup=("minhash",), filters=(), clusters=10 ** 6),
                           progress=False)
  kept = {json.loads(line)["text"] for line in open(tmp_path / "out" / report_shard(tmp_path))}
  sets = {d: curate.shingles(d, 5) for d in docs}
  jaccard = lambda a, b: len(sets[a] & sets[b]) / len(sets[a] | sets[b])
  # Every base is kept (they come first and are unrelated); a variant should go iff it is
  # >= 0.8 similar to its base, and a removal is right iff some kept document is that similar.
  should_go = [v for i, v in enumerate(docs[200:]) if jaccard(v, docs[i % 200]) >= 0.8]
  removed = [d for d in docs if d not in kept]
  right = [d for d in removed if max(jaccard(d, k) for k in kept) >= 0.8]
  recall = sum(d not in kept for d in should_go) / len(should_go)
  precision = len(right) / len(removed)
  assert len(should_go) == 200 and recall >= 0.95 and precision >= 0.95, (recall, precision)
  assert report["near_duplicates"] == len(removed)


def report_shard(tmp_path):
  (name,) = [n for n in os.listdir(tmp_path / "out") if n.startswith("shard-")]
  return name


def test_each_filter_removes_what_its_definition_says_and_nothing_else(tmp_path):
  rng = np.random.default_rng(2)
  prose = lambda n: " ".join(rng.choice(["river", "stone", "window", "garden", "letter",
                                         "morning", "yellow", "quiet", "travel", "number"], n))
  cases = {
      None: "\n".join(prose(12) for _ in range(10)),  # passes every filter
      "length": prose(20),  # 20 words < 50
      # 80 two-letter words (mean 2 < 3) drawn from 100, so none repeats much
      "mean_word_length": " ".join("".join(rng.choice(list("abcdefghij"), 2)) for _ in range(80)),
      "symbols": "\n".join(f"# {prose(8)}" for _ in range(10)),  # 10 '#' per 90 words
      "alpha": " ".join(str(1000 + i) for i in range(200)) + " " + prose(20),  # 200/220 no letter
      "repetition": "\n".join([prose(10)] * 6 + [prose(10) for _ in range(4)]),  # 5 of 10 lines
  }
  # The n-gram part of "repetition", with no line repeated: one 2-gram covers 40% of letters.
  cases["repetition_ngram"] = " ".join(["alpha beta"] * 20 + [prose(1) for _ in range(40)])
  for name, text in cases.items():
    failed = curate.failed_filter(text, curate.FILTERS, curate.Thresholds())
    assert failed == (name.split("_ngram")[0] if name else None), (name, failed)
    # ... and each only fails its own filter: every other filter alone passes it.
    for other in curate.FILTERS:
      if name is None or other != name.split("_ngram")[0]:
        assert curate.failed_filter(text, (other,), curate.Thresholds()) is None, (name, other)
  _write_jsonl(tmp_path / "f.jsonl", list(cases.values()))
  report = prepare.prepare([str(tmp_path / "f.jsonl")], str(tmp_path / "out"),
                           prepare.Settings(dedup=()), progress=False)
  assert report["removed_by_filter"] == {"length": 1, "mean_word_length": 1, "symbols": 1,
                                         "alpha": 1, "repetition": 2}
  assert report["docs_out"] == 1
  none = prepare.prepare([str(tmp_path / "f.jsonl")], str(tmp_path / "out2"), NO_FILTERS,
                         progress=False)
  assert none["docs_out"] == len(cases)


def test_output_is_a_corpus_and_an_interrupted_run_restarts_clean(tmp_path):
  rng = np.random.default_rng(3)
  src = tmp_path / "src"
  src.mkdir()
  for i in range(12):
    (src / f"{i}.txt").write_text(" ".join(_words(rng, 60)))
  (src / "copy.txt").write_text((src / "3.txt").read_text())
  out = tmp_path / "out"
  # A directory that is not ours is refused and left alone.
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "shard-00000-of-00001.jsonl").write_text("mine\n")
  with pytest.raises(prepare.PrepareError, match="not written by prepare"):
    prepare.prepare([str(src)], str(foreign), progress=False)
  assert os.listdir(foreign) == ["shard-00000-of-00001.jsonl"]
  # What a killed run leaves: its marker, staged shards and a shard moved into OUT, no report.
  (out / ".incomplete").mkdir(parents=True)
  (out / ".prepare-running").write_text("")
  (out / ".incomplete" / "shard-00000-of-00009.jsonl").write_text("{}\n")
  (out / "shard-00003-of-00009.jsonl").write_text('{"text": "stale"}\n')
  settings = prepare.Settings(filters=(), docs_per_shard=5)
  report = prepare.prepare([str(src)], str(out), settings, progress=False)
  assert sorted(os.listdir(out)) == ["report.json", "shard-00000-of-00003.jsonl",
                                     "shard-00001-of-00003.jsonl", "shard-00002-of-00003.jsonl"]
  assert report["docs_in"] == 13 and report["docs_out"] == 12 and report["exact_duplicates"] == 1
  assert report["clusters"][0]["size"] == 2
  assert {"kept", "size", "removed"} <= set(report["clusters"][0])
  for key in ("docs_in", "docs_out", "bytes_in", "bytes_out", "exact_duplicates",
              "near_duplicates", "clusters", "removed_by_filter", "docs_per_s"):
    assert key in json.loads((out / "report.json").read_text())
  # The training pipeline reads the shards as a corpus: every kept document, once.
  c = corpus_lib.build_corpus([str(out / "*.jsonl")], eval_fraction=0.2)
  texts = [corpus_lib.read_document(d) for d in c.train + c.eval]
  assert len(texts) >= 12 and "stale" not in "".join(texts)
  with pytest.raises(prepare.PrepareError, match="already holds a prepared corpus"):
    prepare.prepare([str(src)], str(out), settings, progress=False)
  again = prepare.prepare([str(src)], str(out), settings, overwrite=True, progress=False)
  assert again["docs_out"] == 12


def test_text_that_is_not_utf8_is_kept_with_replacement_only_when_asked(tmp_path):
  (tmp_path / "good.txt").write_text("plain words here\n")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9 words here\n".encode("latin-1"))
  settings = prepare.Settings(dedup=("exact",), filters=())
  report = prepare.prepare([str(tmp_path / "*.txt")], str(tmp_path / "out"), settings,
                           progress=False, undecodable="replace")
  assert report["docs_out"] == 2
  assert report["undecodable"] == {"count": 1, "action": "replace",
                                   "first": [str(tmp_path / "latin1.txt")]}
  c = corpus_lib.build_corpus([str(tmp_path / "out" / "*.jsonl")], eval_fraction=0.5)
  texts = sorted(corpus_lib.read_document(d) for d in c.train + c.eval)
  assert texts == ["caf\ufffd words here\n", "plain words here\n"]


def test_workers_give_the_same_result(tmp_path):
  rng = np.random.default_rng(4)
  base = [" ".join(_words(rng, 100)) for _ in range(20)]
  docs = base + [b.replace(b.split()[5], "zz", 1) for b in base[:10]] + base[:3]
  _write_jsonl(tmp_path / "w.jsonl", docs)
  one = prepare.prepare([str(tmp_path / "w.jsonl")], str(tmp_path / "o1"), NO_FILTERS,
                        progress=False)
  two = prepare.prepare([str(tmp_path / "w.jsonl")], str(tmp_path / "o2"),
                        prepare.Settings(filters=(), workers=2), progress=False)
  for key in ("docs_out", "exact_duplicates", "near_duplicates", "clusters"):
    assert one[key] == two[key], key
  assert (one["exact_duplicates"], one["near_duplicates"]) == (3, 10)


def test_cli_prints_the_summary_and_refuses_bad_flags_in_one_line(tmp_path):
  _write_jsonl(tmp_path / "s.jsonl", ["one two three"] * 3)
  run = lambda *args: subprocess.run([sys.executable, "-m", "jaxllm.data", *args],
                                     capture_output=True, text=True, timeout=300)
  (tmp_path / "latin1.txt").write_bytes("one two café\n".encode("latin-1"))
  ok = run("prepare", f"--data={tmp_path / 's.jsonl'},{tmp_path / 'latin1.txt'}",
           f"--out={tmp_path / 'out'}", "--filters=none", "--progress=false")
  assert ok.returncode == 0, ok.stderr
  summary = json.loads(ok.stdout.strip().splitlines()[-1])
  assert summary["exact_duplicates"] == 2 and summary["docs_out"] == 1
  # The file that is not UTF-8 is left out and counted, never written with U+FFFD.
  assert summary["undecodable"] == 1
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  assert report["undecodable"] == {"count": 1, "action": "skip",
                                   "first": [str(tmp_path / "latin1.txt")]}
  for args, fragment in ((["--filters=length,colour"], "--filters=colour is not one of"),
                         (["--dedup=fuzzy"], "--dedup=fuzzy is not one of"),
                         (["--minhash_threshold=1.5"], "must be in (0, 1]"),
                         (["--undecodable=ignore"], "--undecodable=ignore: value should be")):
    bad = run("prepare", f"--data={tmp_path / 's.jsonl'}", f"--out={tmp_path / 'bad'}", *args)
    assert bad.returncode == 2 and fragment in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1, bad.stderr
