"""Errors for checkpoints that cannot be read as asked."""


class UnsupportedCheckpoint(ValueError):
  """A file that is corrupt, truncated or of an unsupported kind; the message names what."""
