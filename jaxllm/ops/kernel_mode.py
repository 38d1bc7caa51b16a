"""Which path a traced product takes, as a scoped context read at trace time: the modes that
`quant_matmul.int4_kernel` and `cpu_gemv.cpu_kernel` share."""

from __future__ import annotations

import contextlib
import contextvars

MODES = ("auto", "always", "never")


@contextlib.contextmanager
def scoped(var: contextvars.ContextVar, mode: str, what: str):
  """Sets `var` to `mode` (one of MODES) within the block; `what` names it in the error."""
  if mode not in MODES:
    raise ValueError(f"{what} mode {mode!r}: one of {MODES}")
  token = var.set(mode)
  try:
    yield
  finally:
    var.reset(token)
