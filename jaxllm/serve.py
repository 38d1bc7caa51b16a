"""`python -m jaxllm.serve --checkpoint=PATH [--host=127.0.0.1 --port=8000 --api_key=KEY
--max_slots=8 --kv_memory=1GiB|0.9 --num_pages=N --page_size=16 --prefill_chunk=64 --mixed_steps
--model_name=NAME --sink_tokens=4 --stream_window=N --adapter=[NAME=]DIR --nolog_requests]`

An OpenAI-compatible server (`/v1/completions`, `/v1/chat/completions`, `/v1/models`,
`/health`, `/metrics`) over the continuous-batching engine. Binds to 127.0.0.1 unless told
otherwise. Needs the serve extra: `pip install 'jaxllm[serve]'`. It checks the port before
loading the model, says where it serves and how large its KV pool is, and logs a line per
request. `--adapter=DIR` serves every request with one LoRA adapter; `--adapter=NAME=DIR`,
repeated, serves several, each request choosing by its `model` field (multi-LoRA: requests of
different adapters share a batch).
"""

from __future__ import annotations

import os
import socket
import sys

from absl import app, flags

from jaxllm.cli import common
from jaxllm.config import KV_CACHE_DTYPES

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Workdir, jaxllm/HF directory or .gguf.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (0.0.0.0 exposes it).")
_PORT = flags.DEFINE_integer("port", 8000, "TCP port.", lower_bound=0, upper_bound=65535)
_API_KEY = flags.DEFINE_string("api_key", None, "Require `Authorization: Bearer KEY` "
                               "(default: $JAXLLM_API_KEY, else no auth).")
_MODEL_NAME = flags.DEFINE_string("model_name", None, "Name served in /v1/models (default: "
                                  "the checkpoint's base name without .gguf; the full file "
                                  "name is accepted too).")
_MAX_SLOTS = flags.DEFINE_integer("max_slots", 8, "Requests decoded together.", lower_bound=1)
_KV_MEMORY = flags.DEFINE_string(
    "kv_memory", None, "Memory for the KV page pool: a size (512MiB, 2GiB) or, on an "
    "accelerator, a fraction of the device memory left after the weights (0.9). Default: 1GiB "
    "on a CPU, 0.9 on an accelerator; never more than --max_slots full-length sequences, never "
    "less than one.")
_NUM_PAGES = flags.DEFINE_integer("num_pages", None, "KV pages in the pool, instead of "
                                  "--kv_memory (max_slots x max_seq_len / page_size pages: "
                                  "every slot full-length, the old default).", lower_bound=1)
_LOG_REQUESTS = flags.DEFINE_bool("log_requests", True, "A line per request on stderr: "
                                  "client, method and path, status, tokens, milliseconds.")
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
_MIXED_STEPS = flags.DEFINE_bool(
    "mixed_steps", False, "Prompt tokens of requests being prefilled ride in the decode "
    "steps (up to --prefill_chunk per step) instead of a prefill call between them: a long "
    "prompt arriving slows the running streams' steps instead of stalling them.")
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
_ADAPTER = flags.DEFINE_multi_string(
    "adapter", [], "A LoRA adapter directory in PEFT's format (adapter_config.json + "
    "adapter_model.safetensors, ours or PEFT's) every request is served with, unmerged; or "
    "NAME=DIR, repeated: adapters a request picks by its model field (the checkpoint's name: "
    "none), decoded in one batch.")
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
  import jax
  if jax.process_index() == 0:  # the one that serves HTTP: a busy port fails before loading
    _check_port(_HOST.value, _PORT.value)
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
        stream_window=_STREAM_WINDOW.value, kv_memory=_KV_MEMORY.value,
        log_requests=_LOG_REQUESTS.value, mixed_steps=_MIXED_STEPS.value,
        **server.adapter_arguments(_ADAPTER.value))
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  if jax.process_index() > 0:  # multi-host: process 0 serves HTTP, this one runs its steps
    engine.follow()
    return
  pool = application.state.kv_pool
  print(f"serving {application.state.model_name} on http://{_HOST.value}:{_PORT.value} "
        f"(KV pool: {pool['pages']} pages x {pool['page_size']} tokens = {pool['tokens']} "
        f"tokens, {pool['bytes'] / 2**30:.2f} GiB {pool['dtype']} per engine, by "
        f"{pool['chosen_by']}; max_slots {_MAX_SLOTS.value})", file=sys.stderr, flush=True)
  try:
    uvicorn.run(application, host=_HOST.value, port=_PORT.value, log_level="warning")
  finally:
    engine.shutdown()


def _check_port(host: str, port: int) -> None:
  """Refuses a host:port that cannot be bound now, before minutes of model loading."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
      s.bind((host, port))
    except OSError as e:
      raise common.CommandError(f"cannot listen on {host}:{port}: {e.strerror}") from None


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
