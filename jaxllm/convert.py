"""`python -m jaxllm.convert --checkpoint=PATH --out=DIR --format=hf|orbax|hf-reward
[--hf_model_type=phi3]`

Reads any checkpoint `jaxllm.load` reads (workdir, jaxllm directory, Hugging Face directory,
.gguf) and writes a Hugging Face directory (float32 safetensors, config, tokenizer; loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`) or a jaxllm orbax directory (restores
onto any mesh; `jaxllm.load`, generate and eval read it). `--format=hf-reward` reads a reward
model (`jaxllm reward`'s workdir or its adapter/ or model/) and writes it, adapters merged, as
a `...ForSequenceClassification` directory with one label
(`transformers.AutoModelForSequenceClassification`; `jaxllm rl --config.rl.reward_model=DIR`
reads it back).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from jaxllm.cli import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint to read.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (must not exist or be empty).")
_FORMAT = flags.DEFINE_enum("format", None, ["hf", "orbax", "hf-reward"], "Output format "
                            "(hf-reward: a reward model as a sequence-classification model).")
_HF_MODEL_TYPE = flags.DEFINE_enum(
    "hf_model_type", None, ["phi3"],
    "--format=hf: write this family when it holds the same model as the default one (phi3: a "
    "Llama-shaped model in Phi-3's fused qkv/gate_up layout). Default: the family the config "
    "implies (llama, mistral, qwen2, qwen3, olmo2, mixtral, qwen2_moe, qwen3_moe).")
common.define_old_spelling("src", "checkpoint")
common.define_old_spelling("dst", "out")
flags.mark_flags_as_required(["checkpoint", "out", "format"])


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = common.empty_out_dir(_OUT.value)
  common.initialize_distributed()
  from jaxllm.checkpoint import convert
  if _FORMAT.value == "hf-reward":
    from jaxllm.rl import rewards
    from jaxllm.train import reward
    try:
      model, head = rewards.read_reward_model(_CHECKPOINT.value)
    except ValueError as e:
      raise common.CommandError(str(e)) from None
    reward.export_hf(out, model.config, {"model": model.params, reward.HEAD: head},
                     model.tokenizer)
    print(f"wrote a sequence-classification model to {out}", file=sys.stderr)
    print(json.dumps({"format": _FORMAT.value, "checkpoint": _CHECKPOINT.value, "out": out}))
    return
  ckpt = convert.read_checkpoint(_CHECKPOINT.value)
  if _FORMAT.value == "hf":
    convert.export_hf(ckpt, out, _HF_MODEL_TYPE.value)
  else:
    convert.export_orbax(ckpt, out)
  print(f"wrote {_FORMAT.value} checkpoint to {out}", file=sys.stderr)
  print(json.dumps({"format": _FORMAT.value, "checkpoint": _CHECKPOINT.value, "out": out}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
