"""Errors for checkpoints that cannot be read as asked."""

from jaxllm.errors import UserError


class UnsupportedCheckpoint(UserError, ValueError):
  """A file that is corrupt, truncated or of an unsupported kind; the message names what."""
