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
import time
import uuid
from typing import Any

from jaxllm.inference import engine as engine_lib
from jaxllm.inference import kv_cache, sampling

try:
  import fastapi
  import pydantic
  from fastapi import responses
except ImportError as e:  # pragma: no cover - exercised only without the extra
  raise ImportError("serving needs the serve extra: pip install 'jaxllm[serve]'") from e


class APIError(Exception):

  def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                   param, code)

  def response(self):
    return responses.JSONResponse(
        {"error": {"message": self.message, "type": self.type, "param": self.param,
                   "code": self.code}}, status_code=self.status)


class _Common(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  model: str
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0  # extension (vLLM)
  min_p: float = 0.0  # extension
  repetition_penalty: float = 1.0  # extension
  frequency_penalty: float = 0.0
  presence_penalty: float = 0.0
  seed: int | None = None
  stop: str | list[str] | None = None
  n: int = 1
  stream: bool = False


class CompletionRequest(_Common):
  prompt: str | list[int]
  logprobs: int | None = None


class ChatMessage(pydantic.BaseModel):
  role: str
  content: str


class ChatRequest(_Common):
  messages: list[ChatMessage]
  logprobs: bool = False
  top_logprobs: int | None = None


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


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
  """Characters at the end of `text` that could still grow into a stop string."""
  hold = 0
  for s in stops:
    for k in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:k]):
        hold = max(hold, k)
        break
  return hold


def create_app(model, engine: engine_lib.Engine, *, model_name: str,
               api_key: str | None = None) -> "fastapi.FastAPI":
  """The ASGI app; `model` is a `jaxllm.LoadedModel` (tokenizer, chat template)."""
  app = fastapi.FastAPI(title="jaxllm", docs_url=None, redoc_url=None)
  metrics = _Metrics()
  tok = model.tokenizer
  created = int(time.time())

  @app.exception_handler(APIError)
  async def _api_error(request, exc: APIError):
    return exc.response()

  @app.exception_handler(fastapi.exceptions.RequestValidationError)
  async def _validation_error(request, exc):
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}",
                    param=param).response()

  def _auth(request: fastapi.Request):
    if api_key is None:
      return
    header = request.headers.get("authorization", "")
    if not secrets.compare_digest(header, f"Bearer {api_key}"):
      raise APIError(401, "invalid or missing API key", type_="authentication_error",
                     code="invalid_api_key")

  def _check_model(name: str):
    if name != model_name:
      raise APIError(404, f"model {name!r} does not exist (this server has {model_name!r})",
                     param="model", code="model_not_found")

  def _sampling_params(body: _Common, seed: int) -> sampling.SamplingParams:
    max_tokens = body.max_completion_tokens or body.max_tokens or 16
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
      return sampling.SamplingParams(
          temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
          repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
          presence_penalty=body.presence_penalty, seed=seed, max_tokens=max_tokens, stop=stop)
    except ValueError as e:
      raise APIError(400, str(e)) from None

  def _submit(ids: list[int], body: _Common, loop, queue: asyncio.Queue, index: int):
    seed = (body.seed + index) if body.seed is not None else secrets.randbits(62)
    params = _sampling_params(body, seed)

    def on_token(req, t):
      loop.call_soon_threadsafe(queue.put_nowait, ("token", index, req))

    def on_finish(req):
      metrics.finished(req)
      loop.call_soon_threadsafe(queue.put_nowait, ("finish", index, req))

    try:
      return engine.submit(ids, params, on_token=on_token, on_finish=on_finish)
    except ValueError as e:
      raise APIError(400, str(e), param="messages" if isinstance(body, ChatRequest)
                     else "prompt", code="context_length_exceeded"
                     if "exceeds the context" in str(e) else None) from None

  async def _run(http_request: fastapi.Request, body: _Common, ids: list[int], chat: bool):
    if not 1 <= body.n <= 16:
      raise APIError(400, f"n={body.n} must be in [1, 16]", param="n")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    reqs = []
    try:
      for i in range(body.n):
        reqs.append(_submit(ids, body, loop, queue, i))
    except APIError:
      for r in reqs:
        engine.cancel(r)
      raise
    metrics.requests += 1
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    if body.stream:
      return responses.StreamingResponse(
          _stream(http_request, body, reqs, queue, rid, chat), media_type="text/event-stream")
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
    return _full_response(body, reqs, rid, chat, ids)

  def _text(r: engine_lib.Request) -> str:
    return r.text if r.finish_reason == "stop" and r.params.stop and r.text else tok.decode(
        r.tokens)

  def _logprobs(body, chat, tokens, logprobs):
    """OpenAI's logprobs object for these tokens, or None when the request did not ask."""
    if chat and body.logprobs:
      return {"content": [{"token": tok.decode([t]), "logprob": lp, "bytes": None,
                           "top_logprobs": []} for t, lp in zip(tokens, logprobs)]}
    if not chat and body.logprobs is not None:
      return {"tokens": [tok.decode([t]) for t in tokens], "token_logprobs": list(logprobs),
              "top_logprobs": None, "text_offset": None}
    return None

  def _usage(ids, reqs):
    out = sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": len(ids), "completion_tokens": out,
            "total_tokens": len(ids) + out}

  def _finish_reason(r):
    return "length" if r.finish_reason == "length" else "stop"

  def _full_response(body, reqs, rid, chat, ids):
    choices = []
    for i, r in enumerate(reqs):
      c: dict[str, Any] = {"index": i, "finish_reason": _finish_reason(r),
                           "logprobs": _logprobs(body, chat, r.tokens, r.logprobs)}
      if chat:
        c["message"] = {"role": "assistant", "content": _text(r)}
      else:
        c["text"] = _text(r)
      choices.append(c)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model_name, "choices": choices,
            "usage": _usage(ids, reqs)}

  async def _stream(http_request, body, reqs, queue, rid, chat):
    sent = [0] * len(reqs)  # characters of each choice's text already sent
    ntok = [0] * len(reqs)
    obj = "chat.completion.chunk" if chat else "text_completion"
    stops = reqs[0].params.stop

    def chunk(i, text, finish=None, tokens=(), logprobs=()):
      if chat:
        delta = {"content": text} if text or finish is None else {}
        c = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": None}
      else:
        c = {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
      if tokens:
        c["logprobs"] = _logprobs(body, chat, tokens, logprobs)
      data = {"id": rid, "object": obj, "created": int(time.time()), "model": model_name,
              "choices": [c]}
      return f"data: {json.dumps(data)}\n\n"

    try:
      if chat:
        for i in range(len(reqs)):
          yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': int(time.time()), 'model': model_name, 'choices': [{'index': i, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None, 'logprobs': None}]})}\n\n"  # noqa: E501
      pending = len(reqs)
      while pending:
        try:
          kind, i, r = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
          if await http_request.is_disconnected():
            return
          continue
        if kind == "finish":
          pending -= 1
          text = _text(r)
        else:
          text = tok.decode(r.tokens)
          if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
            continue
          text = text[:len(text) - _stop_holdback(text, stops)] if stops else text
        new_tokens, new_logprobs = r.tokens[ntok[i]:], r.logprobs[ntok[i]:]
        if len(text) > sent[i] or new_tokens:
          yield chunk(i, text[sent[i]:], tokens=new_tokens, logprobs=new_logprobs)
          sent[i] = max(sent[i], len(text))
          ntok[i] = len(r.tokens)
        if kind == "finish":
          yield chunk(i, "", finish=_finish_reason(r))
      yield "data: [DONE]\n\n"
    finally:
      for r in reqs:
        if not r.done:
          engine.cancel(r)

  @app.get("/health")
  async def health():
    return {"status": "ok"}

  @app.get("/v1/models")
  async def models(request: fastapi.Request):
    _auth(request)
    return {"object": "list", "data": [{"id": model_name, "object": "model",
                                        "created": created, "owned_by": "jaxllm"}]}

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
  async def completions(request: fastapi.Request, body: CompletionRequest):
    _auth(request)
    _check_model(body.model)
    if isinstance(body.prompt, str):
      ids = model.prompt_ids(body.prompt)
    else:
      ids = list(body.prompt)
    if not ids:
      raise APIError(400, "prompt is empty", param="prompt")
    return await _run(request, body, ids, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: fastapi.Request, body: ChatRequest):
    _auth(request)
    _check_model(body.model)
    if not body.messages:
      raise APIError(400, "messages is empty", param="messages")
    try:
      ids = model.chat_ids([m.model_dump() for m in body.messages])
    except ValueError as e:
      raise APIError(400, str(e), param="messages") from None
    return await _run(request, body, ids, chat=True)

  return app


def build(checkpoint: str, *, max_slots=8, num_pages=None, page_size=16, prefill_chunk=64,
          max_seq_len=None, model_name=None, api_key=None, kv_cache_dtype="float32",
          speculative_k=0, draft=None):
  """(app, engine) for a checkpoint (quantized ones too); the engine's loop is started.
  `draft`: a `LoadedModel.draft` spec (ngram[:N], layer_skip:N, int4[:G], int8, PATH)."""
  import jaxllm
  model = jaxllm.load(checkpoint)
  max_len = max_seq_len or model.config.max_seq_len
  pages = num_pages or max_slots * kv_cache.pages_for(max_len, page_size)
  engine = engine_lib.Engine(
      model.graphdef, model.params,
      engine_lib.EngineConfig(max_slots=max_slots, num_pages=pages, page_size=page_size,
                              prefill_chunk=prefill_chunk, max_seq_len=max_len,
                              cache_dtype=kv_cache_dtype, speculative_k=speculative_k),
      eos_id=model.tokenizer.eos_id, decode=model.tokenizer.decode,
      draft=model.draft(draft) if draft else None)
  engine.start()
  name = model_name or os.path.basename(os.path.normpath(checkpoint))
  return create_app(model, engine, model_name=name, api_key=api_key), engine
