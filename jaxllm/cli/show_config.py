"""`--show_config`: the resolved experiment config, every key with its value and what it means,
in the `--config.section.key=value` spelling that overrides it."""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize

from jaxllm import config as config_lib

_FIELD = re.compile(r"\s+(\w+)\s*:")


def field_notes(section_cls) -> dict[str, str]:
  """Each field of a config dataclass -> the comment written above it (or after it on its
  line), joined into one line; "" for a field that follows a commented one without a break
  (the comment above speaks for the group); fields with neither are absent. Read from the
  source, where the meanings are kept next to the defaults."""
  source = inspect.getsource(section_cls)
  comments: dict[int, str] = {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      comments[tok.start[0]] = tok.string.lstrip("#").strip()
  fields = {f.name for f in dataclasses.fields(section_cls)}
  notes, pending, in_group = {}, [], False
  for number, line in enumerate(source.splitlines(), start=1):
    if line.strip().startswith("#"):
      pending.append(comments[number])
      continue
    match = _FIELD.match(line)
    if match and match.group(1) in fields:
      inline = [comments[number]] if number in comments else []
      if pending or inline:
        notes[match.group(1)] = " ".join(pending + inline)
      elif in_group:
        notes[match.group(1)] = ""
      in_group = match.group(1) in notes
    else:
      in_group = False
    pending = []
  return notes


def describe(cfg: config_lib.Config) -> str:
  """Every section's keys, `section.key = value` with the key's meaning above it."""
  lines = [f"# experiment {cfg.name!r}: override any key with --config.SECTION.KEY=VALUE"]
  for section in dataclasses.fields(cfg):
    value = getattr(cfg, section.name)
    if not dataclasses.is_dataclass(value):
      continue
    cls = type(value)
    # dataclasses write a signature as the docstring of a class that has none
    doc = [] if (cls.__doc__ or "").startswith(f"{cls.__name__}(") else (
        (cls.__doc__ or "").strip().splitlines())
    lines += ["", f"# --- {section.name}" + (f": {doc[0]}" if doc else "")]
    notes = field_notes(cls)
    for field in dataclasses.fields(value):
      if notes.get(field.name):
        lines.append(f"# {notes[field.name]}")
      lines.append(f"{section.name}.{field.name} = {getattr(value, field.name)!r}")
  return "\n".join(lines) + "\n"
