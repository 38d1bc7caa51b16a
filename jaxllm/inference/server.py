"""OpenAI-compatible HTTP API over the continuous-batching engine (FastAPI + uvicorn).

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream=true` as
server-sent events), GET /v1/models, /health, /metrics (Prometheus text). Errors use OpenAI's
shape `{"error": {"message", "type", "param", "code"}}`. With an api key every /v1 route wants
`Authorization: Bearer <key>`.

The engine runs in its own thread; each HTTP request becomes one engine request per choice
(`n`), whose tokens come back through an asyncio queue. A client that disconnects cancels its
requests, which frees their pages at the engine's next step.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import threading
import time
import uuid

from jaxllm.inference import engine as engine_lib
from jaxllm.inference import generate as gen
from jaxllm.inference import kv_budget
from jaxllm.inference import openai_api as api
from jaxllm.inference import text_stream

try:
  import fastapi
  import starlette.exceptions
  from fastapi import responses
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError("serving needs the serve extra: pip install 'jaxllm[serve]'") from e


class _Metrics:
  """Counters for /metrics beyond the engine's own."""

  def __init__(self):
    self.requests = 0
    self.ttft_sum = 0.0
    self.ttft_count = 0
    self.started = time.monotonic()
    self.recent: list[tuple[float, int]] = []  # (time, tokens) of finished requests

  def finished(self, r: engine_lib.Request):
    now = time.monotonic()
    if r.first_token_at is not None:
      self.ttft_sum += r.first_token_at - r.arrival
      self.ttft_count += 1
    self.recent = [(t, n) for t, n in self.recent if now - t < 60] + [(now, len(r.tokens))]

  def tokens_per_s(self) -> float:
    now = time.monotonic()
    window = min(60.0, now - self.started)
    return sum(n for t, n in self.recent if now - t < 60) / max(window, 1e-9)


class RequestLog:
  """ASGI middleware: one line per HTTP request once its response has ended (a stream's last
  event included): client, method and path, status, tokens generated (where the handler
  recorded them in the request's state) and milliseconds. Pure ASGI, so that disconnects still
  reach the handlers."""

  def __init__(self, app, write=lambda line: print(line, file=sys.stderr, flush=True)):
    self.app, self.write = app, write

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    start, status = time.perf_counter(), [0]

    async def send_and_note(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_and_note)
    finally:
      client = scope.get("client") or ("-", 0)
      tokens = scope.get("state", {}).get("tokens")
      self.write(f'{client[0]} "{scope["method"]} {scope["path"]}" {status[0] or "-"}'
                 + (f" {tokens} tokens" if tokens is not None else "")
                 + f" {(time.perf_counter() - start) * 1e3:.0f} ms")


SCORED_TOP = 20  # alternatives computed per position (the most a request may ask): one program


def wants_scores(body) -> bool:
  """Whether a request's response needs a scoring pass over its sequences: a completion's
  prompt logprobs (echo) or top alternatives, a chat reply's top_logprobs."""
  if isinstance(body, api.ChatRequest):
    return bool(body.logprobs and body.top_logprobs)
  return body.logprobs is not None and (body.echo or body.logprobs > 0)


def create_app(model, engine: engine_lib.Engine, *, model_name: str,
               api_key: str | None = None, aliases: tuple[str, ...] = (),
               adapters: tuple[str, ...] = (), log_requests: bool = False) -> "fastapi.FastAPI":
  """The ASGI app; `model` is a `jaxllm.LoadedModel` (tokenizer, chat template). Requests may
  name the model by `model_name` or any of `aliases`; responses say `model_name`.
  `adapters`: names of the engine's LoRA adapter slots 1, 2, ... (`jaxllm.lora.bank`): a
  request naming one is served with it (multi-LoRA), and its responses say that name.
  `log_requests`: a line per request on stderr (`RequestLog`)."""
  app = fastapi.FastAPI(title="jaxllm", docs_url=None, redoc_url=None)
  if log_requests:
    app.add_middleware(RequestLog)
  metrics = _Metrics()
  outs = [api.Responses(model.tokenizer, name) for name in (model_name, *adapters)]
  created = int(time.time())

  @app.exception_handler(api.APIError)
  async def _api_error(request, exc: api.APIError):
    return exc.response()

  @app.exception_handler(starlette.exceptions.HTTPException)
  async def _http_error(request, exc):
    # FastAPI's own errors (a body that is not JSON, unknown routes, wrong methods) in
    # OpenAI's shape too.
    return api.APIError(exc.status_code, str(exc.detail)).response()

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _validation_error(request, exc):
    return api.validation_error(exc.errors()).response()

  def _auth(request: fastapi.Request):
    if api_key is None:
      return
    header = request.headers.get("authorization", "")
    if not secrets.compare_digest(header, f"Bearer {api_key}"):
      raise api.APIError(401, "invalid or missing API key", type_="authentication_error",
                     code="invalid_api_key")

  def _check_model(name: str) -> int:
    """The adapter slot a request's model name asks for (0: the base model)."""
    if name in adapters:
      return adapters.index(name) + 1
    if name != model_name and name not in aliases:
      served = ", ".join(repr(n) for n in (model_name, *adapters))
      raise api.APIError(404, f"model {name!r} does not exist (this server has {served})",
                         param="model", code="model_not_found")
    return 0

  vocabulary = []  # the grammar engine's view of the tokenizer, built at the first use
  vocabulary_lock = threading.Lock()

  def _vocabulary():
    from jaxllm.inference import grammar
    with vocabulary_lock:
      if not vocabulary:
        vocabulary.append(grammar.Vocabulary(model.tokenizer, model.config.vocab_size))
    return vocabulary[0]

  def _constraints(body: api.CommonRequest, count: int, tool_spec=None) -> list:
    """A fresh grammar matcher for each of the request's `count` choices (Nones for free
    text); a 400 when its constraint is invalid. Runs in a worker thread: a large schema takes
    a while to check and compile. `tool_spec`: the grammar a required tool_choice sets."""
    found = api.grammar_spec(body, tool_spec)
    if found is None:
      return [None] * count
    param, spec = found
    vocab = _vocabulary()
    try:
      text = vocab.compile(spec)
    except ValueError as e:
      raise api.APIError(400, f"{param}: {e}", param=param) from None
    return [vocab.constraint(text) for _ in range(count)]

  def _submit(ids: list[int], body: api.CommonRequest, loop, queue: asyncio.Queue, index: int,
              slot: int, constraint):
    seed = (body.seed + index) if body.seed is not None else secrets.randbits(62)
    params = api.sampling_params(body, seed)

    def on_token(req, t):
      loop.call_soon_threadsafe(queue.put_nowait, ("token", index, req))

    def on_finish(req):
      metrics.finished(req)
      loop.call_soon_threadsafe(queue.put_nowait, ("finish", index, req))

    try:
      return engine.submit(ids, params, on_token=on_token, on_finish=on_finish, adapter=slot,
                           constraint=constraint)
    except engine_lib.EngineFailed:
      raise _engine_error() from None
    except ValueError as e:
      raise api.submit_error(e, chat=isinstance(body, api.ChatRequest)) from None

  def _engine_error() -> api.APIError:
    return api.APIError(500, f"the engine failed: {engine.failure!r}", type_="server_error",
                        code="engine_failed")

  def _scores(sequences: list[list[int]], slot: int) -> list:
    """`logprobs.Scored` of each sequence (SCORED_TOP alternatives per position), with the
    engine's current weights and the request's adapter. Runs in a worker thread."""
    from jaxllm.inference import logprobs as logprobs_lib
    try:
      return logprobs_lib.score(engine.graphdef, engine.params, sequences,
                                max_len=engine.max_seq_len,
                                top_k=min(SCORED_TOP, model.config.vocab_size), adapter=slot,
                                batch_size=1)
    except ValueError as e:  # a streaming engine's output past the context
      raise api.APIError(400, f"logprobs: {e}", param="logprobs") from None

  def _check_scoring(body: api.CommonRequest):
    """A 400 for prompt logprobs or top alternatives where they cannot be computed."""
    if wants_scores(body) and engine.lockstep:
      raise api.APIError(400, "echo with logprobs, and top logprobs, are not served by an "
                         "engine spanning several processes", param="logprobs")

  async def _run(http_request: fastapi.Request, body: api.CommonRequest,
                 prompts: list[list[int]], chat: bool, slot: int,
                 tool_format: str | None = None, tool_spec=None, echo: list[str] | None = None):
    """Serves `prompts` (n choices each). `tool_format`: the reply may hold tool calls in
    that format; `tool_spec`: the grammar that makes it call them (a required or named
    tool_choice); `echo`: each prompt's text, written before its completions."""
    _check_scoring(body)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    reqs = []
    constraints = await asyncio.to_thread(_constraints, body, len(prompts) * body.n, tool_spec)
    try:
      for p, ids in enumerate(prompts):
        for j in range(body.n):
          i = p * body.n + j
          reqs.append(_submit(ids, body, loop, queue, i, slot, constraints[i]))
    except api.APIError:
      for r in reqs:
        engine.cancel(r)
      raise
    metrics.requests += 1
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.stream:
      prologue = []
      if echo is not None:  # each choice opens with its prompt (and the prompt's logprobs)
        scored = (await asyncio.to_thread(_scores, prompts, slot)
                  if body.logprobs is not None else [None] * len(prompts))
        for i in range(len(reqs)):
          p = i // body.n
          entries = (None if scored[p] is None else
                     api.scored_entries(prompts[p], [], scored[p], echo=True))
          prologue.append(outs[slot].chunk(body, rid, chat, i, echo[p], entries=entries))
      return responses.StreamingResponse(
          _stream(http_request, body, reqs, queue, rid, chat, outs[slot], tool_format,
                  prologue=prologue, offsets=[len(echo[i // body.n]) for i in range(len(reqs))]
                  if echo is not None else None),
          media_type="text/event-stream")
    try:
      pending = len(reqs)
      while pending:
        try:
          kind, _, _ = await asyncio.wait_for(queue.get(), timeout=0.5)
          pending -= kind == "finish"
        except asyncio.TimeoutError:
          if await http_request.is_disconnected():
            raise asyncio.CancelledError from None
    finally:
      for r in reqs:
        if not r.done:
          engine.cancel(r)
    if any(r.finish_reason == "error" for r in reqs):
      raise _engine_error()
    http_request.state.tokens = sum(len(r.tokens) for r in reqs)  # for the request log
    scores = None
    if wants_scores(body):
      scores = await asyncio.to_thread(
          _scores, [prompts[i // body.n] + r.tokens + ([] if chat else api.ending(r))
                    for i, r in enumerate(reqs)], slot)
    return outs[slot].full(body, reqs, rid, chat, prompts, tool_format, scores=scores,
                           echo=echo)

  async def _stream(http_request, body, reqs, queue, rid, chat, out, tool_format=None,
                    prologue=(), offsets=None):
    """`prologue`: events sent first (echoed prompts); `offsets`: where each choice's
    completion begins in its text (after its echoed prompt)."""
    sent = [0] * len(reqs)  # characters of each choice's text already sent
    base = offsets or [0] * len(reqs)
    ntok = [0] * len(reqs)
    stops = reqs[0].params.stop
    # With tools, text from where a call may begin waits for the end of the reply.
    held = stops
    if tool_format is not None:
      from jaxllm.inference import tool_calls
      held = (*stops, tool_calls.call_marker(tool_format))

    try:
      for event in prologue:
        yield event
      if chat:
        for i in range(len(reqs)):
          yield out.chunk(body, rid, chat, i, "", role=True)
      pending = len(reqs)
      while pending:
        try:
          kind, i, r = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http_request.is_disconnected():
            return
          continue
        if kind == "finish" and r.finish_reason == "error":
          # Mid-stream: the status is sent already; the error goes as an event, then the end.
          yield f"data: {json.dumps(_engine_error().body())}\n\n"
          return
        calls = []
        if kind == "finish":
          pending -= 1
          text = out.text(r)
          if tool_format is not None:
            content, calls = tool_calls.parse(text, tool_format)
            if calls:  # the content besides the calls, where it extends what was sent
              text = content or ""
        else:
          text = text_stream.sendable(model.tokenizer.decode(r.tokens), held)
          if text is None:  # an incomplete UTF-8 character: wait for the rest
            continue
        new_tokens, new_logprobs = r.tokens[ntok[i]:], r.logprobs[ntok[i]:]
        if kind == "finish" and not chat and api.ending(r):  # completions report it too
          new_tokens, new_logprobs = new_tokens + api.ending(r), new_logprobs + [r.stop_logprob]
        if len(text) > sent[i] or new_tokens:
          # Where these tokens' text begins (completions' text_offset), only when it is sent:
          # decoding the whole output again at every event would cost the stream O(n^2).
          offset = (base[i] + len(model.tokenizer.decode(r.tokens[:ntok[i]]))
                    if not chat and body.logprobs is not None and new_tokens else 0)
          yield out.chunk(body, rid, chat, i, text[sent[i]:], tokens=new_tokens,
                          logprobs=new_logprobs, offset=offset)
          sent[i] = max(sent[i], len(text))
          ntok[i] = len(r.tokens)
        if calls:
          yield out.tool_calls_chunk(rid, i, calls)
        if kind == "finish":
          yield out.chunk(body, rid, chat, i, "",
                          finish="tool_calls" if calls else api.finish_reason(r))
      yield "data: [DONE]\n\n"
    finally:
      http_request.state.tokens = sum(len(r.tokens) for r in reqs)  # for the request log
      for r in reqs:
        if not r.done:
          engine.cancel(r)

  @app.get("/health")
  async def health():
    if engine.failure is not None:  # a load balancer takes this server out
      return responses.JSONResponse({"status": "failed", "error": repr(engine.failure)},
                                    status_code=503)
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models(request: fastapi.Request):
    _auth(request)
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": "jaxllm",
         **({"parent": model_name} if name != model_name else {})}
        for name in (model_name, *adapters)]}

  @app.get("/metrics")
  async def prometheus():
    m = engine.metrics()
    lines = []

    def metric(name, kind, help_, value):
      lines.extend([f"# HELP jaxllm_{name} {help_}", f"# TYPE jaxllm_{name} {kind}",
                    f"jaxllm_{name} {value}"])

    metric("queue_depth", "gauge", "Requests waiting for a slot.", m["queue_depth"])
    metric("active_slots", "gauge", "Requests holding a decode slot.", m["active_slots"])
    metric("pages_in_use", "gauge", "KV pages held (requests and prefix cache).",
           m["pages_in_use"])
    metric("pages_total", "gauge", "KV pages in the pool.", m["pages_total"])
    metric("prefix_cached_pages", "gauge", "Pages kept for prefix reuse.",
           m["prefix_cached_pages"])
    metric("generated_tokens_total", "counter", "Tokens generated.",
           m.get("generated_tokens", 0))
    metric("prefix_hit_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
           m.get("prefix_hit_tokens", 0))
    metric("preemptions_total", "counter", "Requests preempted for pages.",
           m.get("preemptions", 0))
    metric("requests_total", "counter", "HTTP generation requests.", metrics.requests)
    metric("tokens_per_second", "gauge", "Generated tokens/s over the last minute.",
           f"{metrics.tokens_per_s():.3f}")
    lines += ["# HELP jaxllm_time_to_first_token_seconds Time to first token.",
              "# TYPE jaxllm_time_to_first_token_seconds summary",
              f"jaxllm_time_to_first_token_seconds_sum {metrics.ttft_sum:.6f}",
              f"jaxllm_time_to_first_token_seconds_count {metrics.ttft_count}"]
    return responses.PlainTextResponse("\n".join(lines) + "\n",
                                       media_type="text/plain; version=0.0.4")

  @app.post("/v1/completions")
  async def completions(request: fastapi.Request, body: api.CompletionRequest):
    _auth(request)
    slot = _check_model(body.model)
    given = body.prompts()
    prompts = [model.prompt_ids(p) if isinstance(p, str) else list(p) for p in given]
    if any(not ids for ids in prompts):
      raise api.APIError(400, "prompt is empty", param="prompt")
    echo = None
    if body.echo:
      echo = [p if isinstance(p, str) else model.tokenizer.decode(p) for p in given]
    return await _run(request, body, prompts, chat=False, slot=slot, echo=echo)

  # vLLM's tokenizer endpoints: clients that count or build tokens themselves (lm-evaluation-
  # harness's remote tokenizer) use the server's own tokenizer through them.
  @app.post("/tokenize")
  async def tokenize(request: fastapi.Request, body: api.TokenizeRequest):
    _auth(request)
    if body.model is not None:
      _check_model(body.model)
    if body.messages is not None:
      if not body.messages:
        raise api.APIError(400, "messages is empty", param="messages")
      try:
        ids = model.chat_ids([m.as_dict() for m in body.messages],
                             add_generation_prompt=body.add_generation_prompt)
      except ValueError as e:
        raise api.APIError(400, str(e), param="messages") from None
    elif body.add_special_tokens:
      ids = model.prompt_ids(body.prompt)
    else:
      ids = model.tokenizer.encode(body.prompt)
    return {"count": len(ids), "max_model_len": engine.max_seq_len, "tokens": ids}

  @app.post("/detokenize")
  async def detokenize(request: fastapi.Request, body: api.DetokenizeRequest):
    _auth(request)
    if body.model is not None:
      _check_model(body.model)
    bad = [t for t in body.tokens if t >= model.config.vocab_size]
    if bad:
      raise api.APIError(400, f"token id {bad[0]} is outside the vocabulary "
                         f"({model.config.vocab_size} ids)", param="tokens")
    return {"prompt": model.tokenizer.decode(body.tokens)}

  @app.get("/tokenizer_info")
  async def tokenizer_info(request: fastapi.Request):
    _auth(request)
    tok = model.tokenizer

    def special(i):  # a special token's text (sentencepiece decodes control ids to "")
      if not 0 <= i < model.config.vocab_size:
        return None
      text = tok.decode([i])
      if not text and hasattr(tok, "processor"):
        text = tok.processor.id_to_piece(i)
      return text or None

    return {"tokenizer_class": type(tok).__name__, "vocab_size": model.config.vocab_size,
            "model_max_length": engine.max_seq_len, "bos_token": special(tok.bos_id),
            "eos_token": special(tok.eos_id), "pad_token": special(tok.pad_id),
            "add_bos_token": bool(tok.add_bos), "chat_template": tok.chat_template}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request, body: api.ChatRequest):
    _auth(request)
    slot = _check_model(body.model)
    if not body.messages:
      raise api.APIError(400, "messages is empty", param="messages")
    messages = [m.as_dict() for m in body.messages]
    tools, choice = body.tool_list(), body.effective_tool_choice()
    from jaxllm.inference import tool_calls
    fmt, native = tool_calls.template_format(model.tokenizer.chat_template)
    active = bool(tools) and choice != "none"
    tool_spec = None
    if tools:
      def check():
        tool_calls.check_tools(tools, _vocabulary())
        return tool_calls.grammar_spec(tools, choice, fmt, parallel=body.parallel_tool_calls)
      try:
        tool_spec = await asyncio.to_thread(check)
      except ValueError as e:
        param = "tool_choice" if "tool_choice" in str(e) else "tools"
        raise api.APIError(400, str(e), param=param) from None
    try:
      if native:  # the template renders the tools and earlier calls itself
        ids = model.chat_ids(messages, tools=tools if active else None)
      elif active or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        # A template without tool support: the tools and earlier calls as text.
        ids = model.chat_ids(tool_calls.plain_messages(messages, tools if active else []))
      else:
        ids = model.chat_ids(messages)
    except ValueError as e:
      raise api.APIError(400, str(e), param="messages") from None
    return await _run(request, body, [ids], chat=True, slot=slot,
                      tool_format=fmt if active else None, tool_spec=tool_spec)

  return app


def default_model_name(checkpoint: str) -> str:
  """The name /v1/models serves by default: the checkpoint's base name without a file
  extension (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct.Q4_1`)."""
  base = os.path.basename(os.path.normpath(checkpoint))
  return base[:-len(".gguf")] if base.endswith(".gguf") else base


def adapter_arguments(values: list[str]) -> dict:
  """`build`'s adapter arguments from serve's --adapter values: one DIR (every request), or
  NAME=DIR each (chosen per request); ValueError for a mix or repeated names."""
  if not values:
    return {}
  named = ["=" in v for v in values]
  if not any(named) and len(values) == 1:
    return {"adapter": values[0]}
  if not all(named):
    raise ValueError("--adapter: give one DIR (every request), or NAME=DIR for each "
                     f"adapter requests choose by name; got {values}")
  pairs = [v.split("=", 1) for v in values]
  names = [n for n, _ in pairs]
  if len(set(names)) < len(names):
    raise ValueError(f"--adapter: names repeat in {names}")
  return {"adapters": dict(pairs)}


def build(checkpoint: str, *, max_slots=8, num_pages=None, page_size=16, prefill_chunk=64,
          max_seq_len=None, model_name=None, api_key=None, kv_cache_dtype="float32",
          speculative_k=0, draft=None, mesh=None, replicas: int = 1, sink_tokens=0,
          stream_window=0, kv_memory=None, log_requests=False, adapter=None, adapters=None,
          mixed_steps=False):
  """(app, engine) for a checkpoint (quantized ones too); the engine's loop is started.
  `app.state.kv_pool` describes the page pool it chose: `num_pages` if given, else from the
  `kv_memory` budget (`jaxllm.inference.kv_budget`; None: the platform's default).

  `stream_window` > 0: StreamingLLM serving (`EngineConfig.stream_window`), each request in a
  constant number of pages and with no length limit.

  `draft`: a `LoadedModel.draft` spec (ngram[:N], layer_skip:N, int4[:G], int8, PATH);
  `mesh`: a Mesh or a spec ("tensor=4") to split the model over (`jaxllm.load`);
  `replicas`: engines on disjoint device groups (each of the spec's shape) behind one router
  (`jaxllm.inference.replicas`). Sizes (`max_slots`, `num_pages`) are per engine.
  `mixed_steps`: prompt tokens ride in the decode steps (`EngineConfig.mixed_steps`).
  `adapter`: a LoRA adapter directory (PEFT's format) every request is served with, unmerged
  (`jaxllm.load(adapter=)`). `adapters`: {name: directory} of LoRA adapters a request picks by
  its `model` field (the checkpoint's name: none), batched together (`jaxllm.lora.bank`).
  In a multi-process run every process calls this; only process 0's engine is started, the
  others must `engine.follow()` (`jaxllm.inference.lockstep`).
  """
  import jax
  import jaxllm
  from jaxllm.inference import replicas as replicas_lib
  from jaxllm.parallel import placement
  if replicas == 1:
    meshes = [mesh]
  elif isinstance(mesh, (str, type(None))):
    meshes = placement.replica_meshes(mesh, replicas)
  else:
    raise ValueError("replicas take their meshes from a spec (mesh='tensor=4'), not a Mesh")
  adapters = dict(adapters or {})
  if adapter is not None and adapters:
    raise ValueError("adapter (one for every request) and adapters (chosen per request) "
                     "exclude each other")
  name = model_name or default_model_name(checkpoint)
  for n in adapters:
    if not n or n == name:
      raise ValueError(f"adapter name {n!r} must be non-empty and differ from the model's "
                       f"name {name!r}")
  chosen_adapter = list(adapters.values()) if adapters else adapter
  models = [jaxllm.load(checkpoint, mesh=m, adapter=chosen_adapter) for m in meshes]
  model = models[0]
  max_len = max_seq_len or model.config.max_seq_len
  stream = gen.stream_of(sink_tokens, stream_window)
  longest = max_len if stream is None else stream.cache_len(prefill_chunk)
  if num_pages:
    pages, chosen = num_pages, "--num_pages"
  else:  # the memory budget, between one longest sequence and every slot holding one
    placed = placement.mesh_of(model.params)
    pages, chosen = kv_budget.num_pages(
        model.config, kv_cache_dtype, page_size=page_size, max_slots=max_slots,
        longest=longest, budget=kv_memory,
        devices=None if placed is None else list(placed.devices.flat))
  config = engine_lib.EngineConfig(max_slots=max_slots, num_pages=pages, page_size=page_size,
                                   prefill_chunk=prefill_chunk, max_seq_len=max_len,
                                   cache_dtype=kv_cache_dtype, speculative_k=speculative_k,
                                   sink_tokens=sink_tokens, stream_window=stream_window,
                                   mixed_steps=mixed_steps)
  # Several processes (a pod slice, multi-host GPUs): process 0 serves, the others follow.
  lockstep = jax.process_count() > 1
  if lockstep and replicas > 1:
    raise ValueError("multi-host serving runs one engine over all processes' devices; "
                     "--replicas is for one host")
  engines = [engine_lib.Engine(m.graphdef, m.params, config, eos_id=m.tokenizer.eos_id,
                               decode=m.tokenizer.decode, draft=m.draft(draft) if draft else None,
                               lockstep=lockstep)
             for m in models]
  engine = engines[0] if len(engines) == 1 else replicas_lib.Replicas(engines)
  if jax.process_index() == 0:
    engine.start()  # the others call engine.follow()
  # The file name with its extension stays a name requests may use (it was the default).
  base = os.path.basename(os.path.normpath(checkpoint))
  application = create_app(model, engine, model_name=name, api_key=api_key,
                           aliases=(base,) if base != name and not model_name else (),
                           adapters=tuple(adapters), log_requests=log_requests)
  application.state.kv_pool = {
      "pages": pages, "page_size": page_size, "tokens": pages * page_size,
      "bytes": pages * page_size * kv_budget.bytes_per_token(model.config, kv_cache_dtype),
      "dtype": kv_cache_dtype, "chosen_by": chosen, "engines": len(engines)}
  application.state.model_name = name
  return application, engine
