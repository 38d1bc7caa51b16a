"""`python -m jaxllm.serve --checkpoint=PATH [--host=127.0.0.1 --port=8000 --api_key=KEY
--max_slots=8 --num_pages=N --page_size=16 --prefill_chunk=64 --model_name=NAME
--sink_tokens=4 --stream_window=N]`

An OpenAI-compatible server (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health`, `/metrics`) over the continuous-batching engine. Binds to 127.0.0.1 unless told
otherwise. Needs the serve extra: `pip install 'jaxllm[serve]'`.
"""

from __future__ import annotations

import os

from absl import app, flags

from jaxllm.cli import common
from jaxllm.config import KV_CACHE_DTYPES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, jaxllm/HF directory or .gguf.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0 exposes it).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.", lower_bound=0, upper_bound=65535)
_API_KEY = flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` "
                               "(default: $JAXLLM_API_KEY, else no auth).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name served in /v1/models (default: "
                                  "the checkpoint's base name).")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 8, "Requests decoded together.", lower_bound=1)
_NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV pages in the pool (default: enough "
                                  "for max_slots full-length sequences).", lower_bound=1)
_KV_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "float32", list(KV_CACHE_DTYPES),
                              "KV page storage (int8: a scale per token and head, a quarter of "
                              "float32's memory).")
_SPEC_K = flags.DEFINE_integer("speculative_k", 0, "Speculative decoding: tokens proposed per "
                               "request per step (0: off).", lower_bound=0, upper_bound=16)
_DRAFT = flags.DEFINE_string("draft", "ngram", "What proposes them: ngram[:N] (prompt lookup), "
                             "layer_skip:N, int4[:G], int8 or the PATH of a smaller model with "
                             "the same tokenizer.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.", lower_bound=1)
_PREFILL_CHUNK = flags.DEFINE_integer("prefill_chunk", 64, "Prompt tokens per prefill step.",
                                      lower_bound=1)
_MAX_SEQ_LEN = flags.DEFINE_integer("max_seq_len", None, "Context length (default: the "
                                    "model's).", lower_bound=2)
_SINKS = flags.DEFINE_integer("sink_tokens", 0, "Streaming (with --stream_window): the first "
                              "tokens every query keeps attending to (attention sinks).",
                              lower_bound=0)
_STREAM_WINDOW = flags.DEFINE_integer(
    "stream_window", 0, "StreamingLLM serving: each request attends to the sink tokens and "
    "this many latest tokens, in constant memory and with no length limit (0: off).",
    lower_bound=0)
_MESH = common.define_mesh_flag()
_REPLICAS = flags.DEFINE_integer("replicas", 1, "Engines on disjoint device groups (each of "
                                 "--mesh's shape) behind one server; requests go to the least "
                                 "loaded (or the one caching their prefix).", lower_bound=1)
flags.mark_flag_as_required("checkpoint")


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    import uvicorn
  except ImportError:
    raise common.CommandError("serving needs the serve extra: pip install 'jaxllm[serve]'")
  common.initialize_distributed()
  try:
    from jaxllm.inference import server
    application, engine = server.build(
        _CHECKPOINT.value, max_slots=_MAX_SLOTS.value, num_pages=_NUM_PAGES.value,
        page_size=_PAGE_SIZE.value, prefill_chunk=_PREFILL_CHUNK.value,
        max_seq_len=_MAX_SEQ_LEN.value, model_name=_MODEL_NAME.value,
        api_key=_API_KEY.value or os.environ.get("JAXLLM_API_KEY"),
        kv_cache_dtype=_KV_DTYPE.value, speculative_k=_SPEC_K.value,
        draft=_DRAFT.value if _SPEC_K.value else None, mesh=_MESH.value,
        replicas=_REPLICAS.value, sink_tokens=_SINKS.value,
        stream_window=_STREAM_WINDOW.value)
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  import jax
  if jax.process_index() > 0:  # multi-host: process 0 serves HTTP, this one runs its steps
    engine.follow()
    return
  try:
    uvicorn.run(application, host=_HOST.value, port=_PORT.value, log_level="warning")
  finally:
    engine.shutdown()


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
