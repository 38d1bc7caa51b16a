"""Structured output: generations held to a JSON schema, a regex, a Lark grammar or a choice.

A request's grammar becomes a token mask before each of its draws: a bitmask `[W]` int32 per
row (bit j of word i allows token 32 i + j), computed on the host by the grammar engine and
applied on the device inside the engine's jitted step (`sampling.apply_token_mask`), so only
tokens that keep the text a prefix of some sentence of the grammar can be drawn. The end of
sequence is allowed exactly where the text is complete; a grammar with nothing left to add ends
the request itself.

The engine is llguidance (guidance-ai's; the one behind llama.cpp's, vLLM's and SGLang's
structured outputs): a Rust library with no Python dependencies in one abi3 wheel (xgrammar
needs torch and transformers, outlines-core ships no mask fill of its own), which builds a
mask for a 49k vocabulary in about a millisecond and reads Hugging Face `tokenizers` JSON
directly. Sentencepiece vocabularies are handed to it piece by piece.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import numpy as np

try:
  import llguidance
  import llguidance.numpy as llguidance_numpy
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError("structured output needs llguidance (the serve extra): "
                    "pip install 'jaxllm[serve]'") from e

# What a request may constrain its output with, and what `GrammarSpec.source` holds for each.
KINDS = {
    "json_object": "None: any JSON object",
    "json_schema": "a JSON schema (dict)",
    "regex": "a regular expression (str, Rust regex syntax, matched whole)",
    "lark": "a Lark grammar (str, llguidance's dialect; `start` is the root)",
    "choice": "one of these strings (a non-empty list of str)",
}
# JSON as Python's json.dumps writes it: whitespace only after separators. Flexible
# whitespace (llguidance's default) lets a model pad forever with newlines and tabs, valid JSON
# that never ends; a schema's own "x-guidance" options override these.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# A schema or grammar larger than this is refused before compiling (a hostile request could
# otherwise hold a server thread on compilation).
MAX_SOURCE_CHARS = 100_000


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
  """What a request's output must match: `kind` in KINDS and its `source`."""
  kind: str
  source: Any = None


def words(vocab_size: int) -> int:
  """int32 words in a row of the bitmask: one bit per token."""
  return (vocab_size + 31) // 32


def one_line(message: str) -> str:
  return " ".join(message.split())


def grammar_text(spec: GrammarSpec) -> str:
  """llguidance's grammar (a JSON string) for a spec; ValueError for a malformed spec."""
  if spec.kind not in KINDS:
    raise ValueError(f"grammar kind {spec.kind!r} is not one of {sorted(KINDS)}")
  if spec.kind == "json_object":
    return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                         defaults=JSON_OPTIONS)
  if spec.kind == "json_schema":
    if not isinstance(spec.source, dict):
      raise ValueError("a JSON schema must be a JSON object")
    try:
      text = json.dumps(spec.source)
    except RecursionError:  # thousands of levels; the grammar engine refuses ~1000 itself
      raise ValueError("the JSON schema nests too deeply") from None
    if len(text) > MAX_SOURCE_CHARS:
      raise ValueError(f"the JSON schema has {len(text)} characters; at most "
                       f"{MAX_SOURCE_CHARS} are accepted")
    return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
  if spec.kind == "choice":
    choices = spec.source
    if (not isinstance(choices, (list, tuple)) or not choices
        or not all(isinstance(c, str) and c for c in choices)):
      raise ValueError("choice needs a non-empty list of non-empty strings")
    if sum(map(len, choices)) > MAX_SOURCE_CHARS:
      raise ValueError(f"the choices have more than {MAX_SOURCE_CHARS} characters")
    # Lark string literals take JSON's escapes.
    return llguidance.LLMatcher.grammar_from_lark(
        "start: " + " | ".join(json.dumps(c) for c in choices))
  if not isinstance(spec.source, str) or not spec.source:
    raise ValueError(f"a {spec.kind} must be a non-empty string")
  if len(spec.source) > MAX_SOURCE_CHARS:
    raise ValueError(f"the {spec.kind} has {len(spec.source)} characters; at most "
                     f"{MAX_SOURCE_CHARS} are accepted")
  if spec.kind == "regex":
    return llguidance.LLMatcher.grammar_from_regex(spec.source)
  return llguidance.LLMatcher.grammar_from_lark(spec.source)


class _SentencePieceVocabulary:
  """What llguidance's TokenizerWrapper reads from a tokenizer: each id's bytes (special
  pieces as 0xFF + name, its convention), eos/bos ids and an encoder."""

  def __init__(self, tokenizer, vocab_size: int):
    sp = tokenizer.processor
    self.tokens, self.special_token_ids = [], []
    for i in range(vocab_size):
      if i >= sp.get_piece_size():
        self.tokens.append(b"")
        continue
      piece = sp.id_to_piece(i)
      if sp.is_byte(i):
        self.tokens.append(bytes([int(piece[3:5], 16)]))
      elif sp.is_control(i) or sp.is_unknown(i):
        self.tokens.append(b"\xff" + piece.encode())
        self.special_token_ids.append(i)
      else:
        self.tokens.append(piece.replace("\u2581", " ").encode())
    self.eos_token_id = tokenizer.eos_id
    self.bos_token_id = tokenizer.bos_id if tokenizer.bos_id >= 0 else None
    self._encode = tokenizer.encode

  def __call__(self, text):
    return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


class Vocabulary:
  """A model's vocabulary as the grammar engine sees it (built once per server: ~0.2 s for
  SmolLM2's 49k tokens). `vocab_size` is the model's (ids past the tokenizer's are never
  allowed)."""

  def __init__(self, tokenizer, vocab_size: int):
    from jaxllm.data import tokenizer as tokenizer_lib
    self.vocab_size = vocab_size
    eos = tokenizer.eos_id if tokenizer.eos_id >= 0 else None
    if isinstance(tokenizer, tokenizer_lib.HFTokenizer):
      self.lltokenizer = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=vocab_size,
                                                eos_token=eos)
    elif isinstance(tokenizer, tokenizer_lib.SentencePieceTokenizer):
      self.lltokenizer = llguidance.LLTokenizer(
          llguidance.TokenizerWrapper(_SentencePieceVocabulary(tokenizer, vocab_size)),
          n_vocab=vocab_size, eos_token=eos)
    else:
      raise ValueError(f"structured output does not know the tokenizer {type(tokenizer)}")

  def compile(self, spec: GrammarSpec) -> str:
    """The grammar of `spec`, checked against this vocabulary; ValueError with the grammar
    engine's reason in one line (an invalid schema or regex, an unsupported keyword)."""
    text = grammar_text(spec)
    error = llguidance.LLMatcher.validate_grammar(text, self.lltokenizer)
    if error and not error.startswith("WARNING"):
      raise ValueError(f"invalid {spec.kind}: {one_line(error)}")
    return text

  def constraint(self, spec_or_grammar: GrammarSpec | str) -> "Constraint":
    """A fresh matcher for one request (a compiled grammar string from `compile`, or a spec)."""
    text = (self.compile(spec_or_grammar) if isinstance(spec_or_grammar, GrammarSpec)
            else spec_or_grammar)
    return Constraint(self, text)


class Constraint:
  """One request's position in its grammar: `fill` its next mask, `consume` each token it
  produced. Not thread-safe: the engine's thread alone drives it once submitted."""

  def __init__(self, vocabulary: Vocabulary, grammar: str):
    self.vocabulary, self.grammar = vocabulary, grammar
    self._matcher = llguidance.LLMatcher(vocabulary.lltokenizer, grammar, log_level=0)
    if self._matcher.is_error():
      raise ValueError(f"invalid grammar: {one_line(self._matcher.get_error())}")
    self.consumed = 0

  def fill(self, mask_W: np.ndarray) -> bool:
    """Writes the allowed next tokens into `mask_W` ([W] int32, C-contiguous); returns False
    at a dead end: the text is incomplete and no token of this vocabulary continues it (the
    grammar engine then allows only the end of sequence, and enters its error state)."""
    llguidance_numpy.fill_next_token_bitmask(self._matcher, mask_W.reshape(1, -1))
    return bool(mask_W.any()) and not self._matcher.is_error()

  def consume(self, token: int) -> bool:
    """Advances past `token`; False when the grammar did not allow it (the matcher is then
    in its error state, `error` says why)."""
    ok = self._matcher.consume_token(int(token))
    self.consumed += ok
    return ok

  def rollback(self, n: int) -> None:
    """Undoes the last n `consume`s (a walk over proposals that may not be kept)."""
    if n:
      self._matcher.rollback(n)
      self.consumed -= n

  def forced_tokens(self) -> list[int]:
    """The tokens the grammar forces next, in its canonical tokenization of the forced text
    ([] where it leaves a choice)."""
    return list(self._matcher.compute_ff_tokens())

  def replay(self, tokens: Sequence[int]) -> bool:
    """Back to the start, then through `tokens` (a request recomputed after preemption
    keeps the tokens it produced)."""
    self._matcher.reset()
    self.consumed = 0
    return all(self.consume(t) for t in tokens)

  def allows(self, token: int) -> bool:
    """Whether `token` may come next (the engine's own check, without advancing)."""
    return self._matcher.validate_tokens([int(token)]) == 1

  def byte_mask(self) -> np.ndarray:
    """`[V]` bool of the allowed next tokens through the grammar engine's other output (a
    byte per token rather than our bitmask): a reference for checks."""
    return np.frombuffer(self._matcher.compute_logit_bias(), np.uint8)[
        :self.vocabulary.vocab_size] > 0

  @property
  def finished(self) -> bool:
    """Nothing may follow but the end of sequence: the text is complete."""
    return self._matcher.is_stopped()

  @property
  def accepting(self) -> bool:
    return self._matcher.is_accepting()

  def forced_bytes(self) -> bytes:
    """What the grammar forces next (b"" where it leaves a choice). Over forced text the mask
    holds the tokens of its canonical tokenization only, not every token spelling it."""
    return self._matcher.compute_ff_bytes()

  @property
  def error(self) -> str:
    """Why the matcher stopped in its error state ("" when it did not), in one line."""
    if not self._matcher.is_error():
      return ""
    return f"{self._matcher.stop_reason()}: {one_line(self._matcher.get_error())[:200]}"


def unpack(mask_BW: np.ndarray, vocab_size: int) -> np.ndarray:
  """`[B, V]` bool of allowed tokens from a `[B, W]` int32 bitmask (a host reference of
  `sampling.apply_token_mask`'s unpacking)."""
  bits = np.unpackbits(np.ascontiguousarray(mask_BW).view(np.uint8), axis=-1,
                       bitorder="little")
  return bits[:, :vocab_size].astype(bool)
