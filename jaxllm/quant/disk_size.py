"""What a quantized checkpoint takes on disk next to its source, and what to tell a user when
quantizing made it larger."""

from __future__ import annotations

import os


def dir_bytes(path: str) -> int:
  """Bytes of a file, or of every file under a directory."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def larger_output_note(disk_before: int, disk_after: int, bits: int) -> str | None:
  """What to tell a user whose quantized output is larger on disk than its source: a source
  stored more compactly than int`bits` (a 4-bit GGUF, read dequantized to float) gains nothing.
  None when the output is not larger."""
  if disk_after <= disk_before:
    return None
  return (f"note: the int{bits} output ({disk_after / 2**20:.1f} MiB) is larger than its "
          f"source ({disk_before / 2**20:.1f} MiB), which stores its weights more compactly "
          "(a 4-bit GGUF is read dequantized); quantize the float model, or keep the source")
