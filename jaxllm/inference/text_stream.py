"""Text of a generation while it is still growing: what a stream may show now, so that what it
has shown is always a prefix of the final text (stop strings cut, characters complete).

The server's SSE streams and the command line's `--stream` both send `sendable(...)` pieces;
`TextStream` is the command line's `on_tokens` (`jaxllm.inference.generate.OnTokens`).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import numpy as np


def stop_holdback(text: str, stops: Sequence[str]) -> int:
  """Characters at the end of `text` that could still grow into a stop string."""
  hold = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:k]):
        hold = max(hold, k)
        break
  return hold


def first_stop(text: str, stops: Sequence[str]) -> int:
  """Where the first of `stops` begins in `text` (-1: none of them is in it)."""
  return min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)


def sendable(text: str, stops: Sequence[str] = ()) -> str | None:
  """The part of a partial generation's `text` that the final text will start with: cut before
  a stop string already in it, less a tail that may still grow into one; None while the text
  ends in an incomplete UTF-8 character (decoded as U+FFFD until its last byte comes)."""
  if text.endswith("\ufffd"):
    return None
  cut = first_stop(text, stops)
  if cut >= 0:
    return text[:cut]
  return text[:len(text) - stop_holdback(text, stops)]


class TextStream:
  """Writes one sequence's text as its tokens arrive (row 0 of the decode loop's output), then
  the rest of the final text at `finish`. `decode`: token ids -> text.

  Trailing whitespace waits for the next character: tokenizers that clean up spaces before
  punctuation (" ." -> ".") rewrite it, and what is written cannot be taken back."""

  def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = (),
               write: Callable[[str], object] | None = None):
    self._decode, self._stops = decode, tuple(stops)
    self._write = write or _write_stdout
    self.shown = ""

  def _show(self, text: str) -> None:
    # A tokenizer may rewrite earlier characters as tokens arrive (a leading space); only an
    # extension of what is shown goes out, the rest waits for `finish`.
    if len(text) > len(self.shown) and text.startswith(self.shown):
      self._write(text[len(self.shown):])
      self.shown = text

  def __call__(self, tokens_BN: np.ndarray, counts_B: np.ndarray) -> None:
    text = sendable(self._decode(np.asarray(tokens_BN)[0, :int(counts_B[0])].tolist()),
                    self._stops)
    if text is not None:
      self._show(text.rstrip())

  def finish(self, text: str) -> None:
    """Writes what the final `text` (stop strings applied) adds to what was shown; should a
    tokenizer have rewritten shown text after all, the final text whole on a new line."""
    if text.startswith(self.shown):
      self._show(text)
    else:
      self._write("\n" + text)
      self.shown = text


def _write_stdout(piece: str) -> None:
  sys.stdout.write(piece)
  sys.stdout.flush()
