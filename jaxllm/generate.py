"""`python -m jaxllm.generate --checkpoint=PATH (--prompt=TEXT | --chat=TEXT | --interactive)
[--max_tokens --temperature --top_k --top_p --min_p --repetition_penalty --seed --stop --cache
--draft --speculative_k --sink_tokens --stream_window --[no]stream]`

PATH: a training workdir, a converted jaxllm directory, a Hugging Face directory or a .gguf
file. `--prompt` continues raw text; `--chat` answers one user message through the model's
chat template; `--interactive` (also `jaxllm chat`) holds a conversation, one user message per
line of stdin (the oldest turns are dropped when the context fills up). KV-cached decoding
(contiguous or paged cache), optionally speculative (`--draft=ngram`, `--draft=layer_skip:N`
or `--draft=PATH` of a smaller model). On a terminal the text is printed as it is generated
(`--stream`, the default there; `--nostream` prints it at the end).
"""

from __future__ import annotations

import sys

from absl import app, flags

from jaxllm.cli import common
from jaxllm.config import KV_CACHE_DTYPES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, jaxllm/HF directory or .gguf.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
_CHAT = flags.DEFINE_string("chat", None, "A user message to answer (uses the chat template).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Tokens to generate at most.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0 = all).",
                              lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass.", lower_bound=0.0,
                            upper_bound=1.0)
_MIN_P = flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p x the top probability.",
                            lower_bound=0.0, upper_bound=1.0)
_REPETITION_PENALTY = flags.DEFINE_float("repetition_penalty", 1.0,
                                         "Penalise tokens already seen (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same output).",
                             lower_bound=0)
_STOP = flags.DEFINE_multi_string("stop", [], "Stop at this text (repeatable).")
_CACHE = flags.DEFINE_enum("cache", "contiguous", ["contiguous", "paged"], "KV cache layout.")
_KV_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "float32", list(KV_CACHE_DTYPES),
                              "KV cache storage (int8: a scale per token and head).")
_DRAFT = flags.DEFINE_string("draft", None, "Speculative draft: ngram[:N] (prompt lookup), "
                             "layer_skip:N (the first N layers), int4[:G] or int8 (the model "
                             "itself quantized), or the checkpoint path of a smaller model "
                             "with the same tokenizer.")
_SPECULATIVE_K = flags.DEFINE_integer("speculative_k", 4, "Speculative: draft tokens per step.",
                                      lower_bound=1, upper_bound=16)
_SINKS = flags.DEFINE_integer("sink_tokens", 0, "Streaming (with --stream_window): the first "
                              "tokens every later one keeps attending to.", lower_bound=0)
_STREAM_WINDOW = flags.DEFINE_integer(
    "stream_window", 0, "StreamingLLM generation in constant memory: attend to the sink tokens "
    "and this many latest tokens, at their positions within the cache, so prompt and output "
    "may run past the model's context (0 = off; contiguous cache, no draft).", lower_bound=0)
_INTERACTIVE = flags.DEFINE_bool("interactive", None, "A conversation: user messages from "
                                  "stdin, one per line, each answered through the chat "
                                  "template with the turns before it (jaxllm chat).")
_STREAM = flags.DEFINE_bool("stream", None, "Print the text as it is generated (default: when "
                            "stdout is a terminal and no --mesh is given).")
_MESH = common.define_mesh_flag()
_ADAPTER = common.define_adapter_flag()
flags.mark_flag_as_required("checkpoint")
flags.mark_flags_as_mutual_exclusive(["prompt", "chat", "interactive"], required=True)
common.define_old_spelling("k", "speculative_k")


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  stream = _STREAM.value if _STREAM.value is not None else (
      sys.stdout.isatty() and not _MESH.value)
  common.initialize_distributed()
  import jaxllm
  from jaxllm.inference import text_stream
  model = jaxllm.load(_CHECKPOINT.value, mesh=_MESH.value, adapter=_ADAPTER.value)
  try:
    sampling = dict(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value,
                    top_k=_TOP_K.value, top_p=_TOP_P.value, min_p=_MIN_P.value,
                    repetition_penalty=_REPETITION_PENALTY.value, seed=_SEED.value,
                    stop=tuple(_STOP.value), cache=_CACHE.value, k=_SPECULATIVE_K.value,
                    kv_cache_dtype=_KV_DTYPE.value, sink_tokens=_SINKS.value,
                    stream_window=_STREAM_WINDOW.value,
                    draft=model.draft(_DRAFT.value) if _DRAFT.value else None)

    def answer(ids: list[int]) -> str:
      """The reply to prompt `ids`, written to stdout (as it comes, when streaming)."""
      printer = text_stream.TextStream(model.tokenizer.decode, _STOP.value) if stream else None
      text = model.generate([ids], details=True, on_tokens=printer, **sampling)[0].text
      if printer is not None:
        printer.finish(text)
      else:
        sys.stdout.write(text)
      print(flush=True)
      return text

    if _INTERACTIVE.value:
      _converse(model, answer)
    elif _CHAT.value is not None:
      answer(model.chat_ids([{"role": "user", "content": _CHAT.value}]))
    else:
      sys.stdout.write(_PROMPT.value)
      answer(model.prompt_ids(_PROMPT.value))
  except ValueError as e:  # bad settings for this model (lengths, draft, sampling values)
    raise common.CommandError(str(e)) from None


def _converse(model, answer) -> None:
  """Reads user messages from stdin until it ends (or `exit`), answering each with the
  conversation so far; the oldest turns go when prompt and reply would exceed the context."""
  if not model.tokenizer.chat_template:
    raise ValueError("this model has no chat template: --interactive needs one (--prompt "
                     "continues raw text)")
  messages: list[dict[str, str]] = []
  tty = sys.stdin.isatty()
  if tty:
    print("(a conversation: type a message and Enter; exit or Ctrl-D ends it)", file=sys.stderr)
  while True:
    if tty:
      sys.stderr.write("> ")
      sys.stderr.flush()
    line = sys.stdin.readline()
    if not line or line.strip() == "exit":
      return
    if not line.strip():
      continue
    messages.append({"role": "user", "content": line.rstrip("\n")})
    ids = model.chat_ids(messages)
    while len(ids) + _MAX_TOKENS.value > model.config.max_seq_len and len(messages) > 1:
      messages = messages[2:]  # the oldest user turn and its reply
      ids = model.chat_ids(messages)
      print(f"(context full: the oldest turn is dropped, {len(messages) // 2 + 1} kept)",
            file=sys.stderr)
    try:
      messages.append({"role": "assistant", "content": answer(ids)})
    except ValueError as e:  # this message alone is too long: say so, and go on without it
      print(f"error: {e}", file=sys.stderr)
      messages.pop()


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
