"""`python -m jaxllm.lora merge --checkpoint=BASE --adapter=DIR --out=OUT` (or `jaxllm lora
merge ...`): the base with a LoRA adapter (PEFT's format, ours or PEFT's) added into its
weights, written as a jaxllm directory that every command reads (`jaxllm convert` takes it on
to Hugging Face). A quantized base is merged in float32: the result is a float checkpoint.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from jaxllm.cli import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The base: workdir, jaxllm/HF directory "
                                  "or .gguf.")
_ADAPTER = flags.DEFINE_string("adapter", None, "The LoRA adapter directory (adapter_config.json "
                               "+ adapter_model.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist or be empty).")
flags.mark_flags_as_required(["checkpoint", "adapter", "out"])


@common.one_line_errors
def main(argv):
  common.positional(argv, "command", ("merge",))
  out = common.empty_out_dir(_OUT.value)
  import jax
  import numpy as np

  import jaxllm
  from jaxllm.checkpoint import convert
  from jaxllm.lora import adapters
  model = jaxllm.load(_CHECKPOINT.value, adapter=_ADAPTER.value)  # the one way adapters load
  params = model.params
  rank, scale = adapters.config_of(params)
  merged = jax.tree.map(np.asarray, adapters.merge(params))
  common.write_model_dir(out, convert.Checkpoint(model.config, merged, model.tokenizer,
                                                 "jaxllm"), name="lora-merged")
  paths = sorted(adapters.adapters(params))
  print(f"merged a rank-{rank} adapter into {len(paths)} weights; wrote {out}", file=sys.stderr)
  print(json.dumps({"checkpoint": _CHECKPOINT.value, "adapter": _ADAPTER.value, "out": out,
                    "rank": rank, "scale": scale, "merged": paths}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
