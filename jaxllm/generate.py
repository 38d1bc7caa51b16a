"""`python -m jaxllm.generate --checkpoint=PATH (--prompt=TEXT | --chat=TEXT) [--max_tokens
--temperature --top_k --top_p --seed]`

PATH: a training workdir, a converted jaxllm directory, a Hugging Face directory or a .gguf
file. `--prompt` continues raw text; `--chat` answers one user message through the model's
chat template. KV-cached decoding.
"""

from __future__ import annotations

from absl import app, flags

from jaxllm.cli import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, jaxllm/HF directory or .gguf.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_CHAT = flags.DEFINE_string("chat", None, "A user message to answer (uses the chat template).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens to generate at most.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).",
                              lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.", lower_bound=0.0,
                            upper_bound=1.0)
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same output).")
flags.mark_flag_as_required("checkpoint")
flags.mark_flags_as_mutual_exclusive(["prompt", "chat"], required=True)


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  common.initialize_distributed()
  import jaxllm
  model = jaxllm.load(_CHECKPOINT.value)
  sampling = dict(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
                  top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  if _CHAT.value is not None:
    print(model.chat(_CHAT.value, **sampling))
  else:
    print(_PROMPT.value + model.generate(_PROMPT.value, **sampling))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
