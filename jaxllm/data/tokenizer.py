"""Tokenizers behind one small interface.

`SentencePieceTokenizer` wraps a sentencepiece model file; `train_sentencepiece` builds one from
text with settings that keep source code exact: identity normalisation, no dummy prefix, runs of
spaces as pieces, newlines as their own symbol and byte fallback, so decode(encode(s)) == s for
any string.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Protocol

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int  # -1 when the vocabulary has none
  eos_id: int
  pad_id: int
  add_bos: bool  # whether a raw-text prompt starts with bos_id
  chat_template: str | None  # jinja2 source, if the model ships one

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class SentencePieceTokenizer:
  """A sentencepiece model; ids below `vocab_size`."""

  def __init__(self, path: str | os.PathLike[str] | None = None, *, model_proto: bytes | None = None):
    if (path is None) == (model_proto is None):
      raise ValueError("give exactly one of path or model_proto")
    if model_proto is None:
      with open(path, "rb") as f:
        model_proto = f.read()
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    self.pad_id = self._sp.pad_id()
    self.add_bos = True  # our training documents start with BOS
    self.chat_template = None

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    """The sentencepiece processor (its pieces, byte and control ids)."""
    return self._sp

  def save(self, path: str | os.PathLike[str]) -> None:
    _atomic_write(path, self.model_proto)


def train_sentencepiece(lines: Iterable[str], vocab_size: int, *, max_sentences: int = 300_000,
                        num_threads: int = 2) -> SentencePieceTokenizer:
  """Trains a BPE sentencepiece model on `lines` (text without newlines)."""
  buffer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buffer, vocab_size=vocab_size,
        model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        byte_fallback=True, character_coverage=0.9999, user_defined_symbols=["\n"],
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, num_threads=num_threads,
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        max_sentence_length=16384, minloglevel=2)
  except RuntimeError as e:
    # sentencepiece reports e.g. "Vocabulary size too high" for small corpora.
    raise ValueError(f"could not train a {vocab_size}-piece tokenizer on this corpus: "
                     f"{str(e).strip().splitlines()[-1]}") from None
  return SentencePieceTokenizer(model_proto=buffer.getvalue())


def _atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
  tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer (tokenizer.json, or built from GGUF vocabularies)."""

  def __init__(self, tokenizer, *, bos_id: int | None, eos_id: int | None,
               pad_id: int | None = None, add_bos: bool = False,
               chat_template: str | None = None):
    self._tok = tokenizer
    self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id = -1 if bos_id is None else bos_id
    self.eos_id = -1 if eos_id is None else eos_id
    self.pad_id = self.eos_id if pad_id is None else pad_id
    self.add_bos = add_bos
    self.chat_template = chat_template

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def token_id(self, piece: str) -> int | None:
    return self._tok.token_to_id(piece)

  def piece(self, token_id: int | None) -> str | None:
    """The vocabulary entry of an id (None for None or a negative id)."""
    if token_id is None or token_id < 0:
      return None
    return self._tok.id_to_token(token_id)

  def to_json(self) -> str:
    """The tokenizer as `tokenizer.json` holds it."""
    return self._tok.to_str()

  def save(self, path: str | os.PathLike[str]) -> None:
    _atomic_write(path, self.to_json().encode())


def tokenizer_from_gguf_vocab(tokens: list[str], merges: list[str], token_types: list[int],
                              pre: str | None):
  """A byte-level BPE `tokenizers.Tokenizer` from GGUF's `tokenizer.ggml.*` fields.

  Control tokens (type 3) become special tokens matched whole. The pre-tokenizer follows
  llama.cpp's `tokenizer.ggml.pre`: GPT-2's regex, with digits split one by one for the
  `smollm` family.
  """
  from tokenizers import AddedToken, Tokenizer as _Tokenizer, decoders, models, pre_tokenizers
  vocab = {tok: i for i, tok in enumerate(tokens)}
  pairs = [tuple(m.split(" ", 1)) for m in merges]
  tok = _Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in ("smollm", "starcoder", "refact"):
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  elif pre in (None, "default", "gpt2", "gpt-2"):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported")
  tok.decoder = decoders.ByteLevel()
  control = [AddedToken(t, special=True, normalized=False)
             for t, kind in zip(tokens, token_types) if kind == 3]
  tok.add_special_tokens(control)
  return tok
