"""`python -m jaxllm.convert --src=PATH --dst=DIR --format=hf|orbax`

Reads any checkpoint `jaxllm.load` reads (workdir, jaxllm directory, Hugging Face directory,
.gguf) and writes a Hugging Face directory (float32 safetensors, config, tokenizer; loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`) or a jaxllm orbax directory (restores
onto any mesh; `jaxllm.load`, generate and eval read it).
"""

from __future__ import annotations

import os

from absl import app, flags

from jaxllm.cli import common

_SRC = flags.DEFINE_string("src", None, "Checkpoint to read.")
_DST = flags.DEFINE_string("dst", None, "Directory to write (must not exist or be empty).")
_FORMAT = flags.DEFINE_enum("format", None, ["hf", "orbax"], "Output format.")
flags.mark_flags_as_required(["src", "dst", "format"])


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if os.path.exists(_DST.value) and os.listdir(_DST.value):
    raise common.CommandError(f"--dst={_DST.value} exists and is not empty (nothing written)")
  common.initialize_distributed()
  from jaxllm.checkpoint import convert
  ckpt = convert.read_checkpoint(_SRC.value)
  if _FORMAT.value == "hf":
    convert.export_hf(ckpt, _DST.value)
  else:
    convert.export_orbax(ckpt, _DST.value)
  print(f"wrote {_FORMAT.value} checkpoint to {_DST.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
