"""Document curation: normalisation, exact and near-duplicate keys, quality filters.

Pure functions of one document's text, applied by `jaxllm.data.prepare`. Exact duplicates share
the SHA-256 of the normalised text (Unicode NFKC, case folded, whitespace runs collapsed). Near
duplicates share word n-grams: a MinHash signature (datasketch) estimates the Jaccard similarity
of two documents' n-gram sets, and `prepare` finds candidate pairs with datasketch's LSH index.
The quality filters follow Gopher's heuristics (Rae et al., 2021, appendix A): word count, mean
word length, symbol-to-word ratio, share of words with a letter, duplicated lines and the share
of characters in the most frequent word n-grams; each has its thresholds in `Thresholds`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import unicodedata

import numpy as np

FILTERS = ("length", "mean_word_length", "symbols", "alpha", "repetition")
# datasketch's permutation scheme and seed: signatures compare only when both match.
MINHASH_SCHEME, MINHASH_SEED = "affine32", 1
_WORD = re.compile(r"\S+")
_SPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
  """NFKC, case folded, whitespace runs collapsed to one space, stripped."""
  return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_key(text: str) -> bytes:
  """The SHA-256 of the normalised text: equal for texts that differ in case or spacing only."""
  return hashlib.sha256(normalise(text).encode("utf-8")).digest()


def shingles(text: str, ngram: int) -> set[str]:
  """The set of word n-grams of the normalised text (the whole text if shorter than n words)."""
  words = normalise(text).split(" ")
  if len(words) <= ngram:
    return {" ".join(words)} if words != [""] else set()
  return {" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)}


def minhash_signature(text: str, *, ngram: int, num_perm: int) -> np.ndarray:
  """`[num_perm]` MinHash of the text's word n-grams (datasketch's permutations)."""
  from datasketch import MinHash
  m = MinHash(num_perm=num_perm, seed=MINHASH_SEED, scheme=MINHASH_SCHEME)
  m.update_batch([s.encode("utf-8") for s in shingles(text, ngram)])
  return m.hashvalues


def lean_minhash(signature: np.ndarray):
  """The datasketch object of a `minhash_signature` (what its LSH index takes)."""
  from datasketch import LeanMinHash
  return LeanMinHash(seed=MINHASH_SEED, hashvalues=signature, scheme=MINHASH_SCHEME)


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Gopher's quality thresholds (the defaults are the paper's)."""
  min_words: int = 50
  max_words: int = 100_000
  min_mean_word_length: float = 3.0
  max_mean_word_length: float = 10.0
  max_symbol_ratio: float = 0.1  # ("#" + "..." + "…") per word
  min_alpha_words: float = 0.8  # share of words with at least one letter
  max_duplicate_lines: float = 0.3  # share of lines that repeat an earlier line
  # Share of word characters covered by the most frequent 2-, 3- and 4-gram.
  max_top_ngram_fractions: tuple[float, float, float] = (0.20, 0.18, 0.16)


def _top_ngram_fraction(words: list[str], n: int) -> float:
  if len(words) < n:
    return 0.0
  counts = collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
  gram, count = counts.most_common(1)[0]
  if count < 2:
    return 0.0
  return count * sum(len(w) for w in gram) / max(sum(len(w) for w in words), 1)


def failed_filter(text: str, enabled: tuple[str, ...], t: Thresholds) -> str | None:
  """The first of `enabled` filters (in `FILTERS` order) that the text fails, or None."""
  words = _WORD.findall(text)
  n = len(words)
  checks = {
      "length": lambda: not t.min_words <= n <= t.max_words,
      "mean_word_length": lambda: n == 0 or not (
          t.min_mean_word_length <= sum(len(w) for w in words) / n <= t.max_mean_word_length),
      "symbols": lambda: n == 0 or (text.count("#") + text.count("...") + text.count("…")) / n
      > t.max_symbol_ratio,
      "alpha": lambda: n == 0 or sum(any(c.isalpha() for c in w) for w in words) / n
      < t.min_alpha_words,
      "repetition": lambda: _repetitive(text, words, t),
  }
  for name in FILTERS:
    if name in enabled and checks[name]():
      return name
  return None


def _repetitive(text: str, words: list[str], t: Thresholds) -> bool:
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if lines and 1 - len(set(lines)) / len(lines) > t.max_duplicate_lines:
    return True
  return any(_top_ngram_fraction(words, n) > limit
             for n, limit in zip((2, 3, 4), t.max_top_ngram_fractions))
