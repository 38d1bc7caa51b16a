"""OpenAI's API as data: request models (with every bound stated, so `/openapi.json` is exact),
the mapping from a request to `SamplingParams`, and the response objects (whole and streamed).
Pure functions of their inputs: testable without HTTP; `jaxllm.inference.server` serves them.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from jaxllm.inference import sampling

try:
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

  def body(self) -> dict:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}

  def response(self):
    return responses.JSONResponse(self.body(), status_code=self.status)


def encodable(text: str) -> str:
  """JSON may carry lone UTF-16 surrogates ("\\udcff") that no tokenizer or UTF-8 response can
  hold: a 400 here, not a 500 deep inside."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    raise ValueError("text holds a lone UTF-16 surrogate, which is not valid Unicode") from None
  return text


Text = Annotated[str, pydantic.AfterValidator(encodable)]
StopText = Annotated[Text, pydantic.Field(min_length=1)]
# OpenAI takes 4 stop strings; evaluation harnesses send a task's own plus the end-of-text one,
# often more (as vLLM does, more are accepted).
MAX_STOPS = 16


# The bounds below are those `sampling.SamplingParams` enforces (and OpenAI documents): stating
# them in the schema makes a bad value a 400 from validation, and tells clients (and generated
# tests) what is valid.
class CommonRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  model: Text
  max_tokens: Annotated[int, pydantic.Field(ge=1, lt=2 ** 31)] | None = None
  max_completion_tokens: Annotated[int, pydantic.Field(ge=1, lt=2 ** 31)] | None = None
  temperature: Annotated[float, pydantic.Field(ge=0, le=2)] = 1.0
  top_p: Annotated[float, pydantic.Field(gt=0, le=1)] = 1.0
  top_k: Annotated[int, pydantic.Field(ge=0, lt=2 ** 31)] = 0  # extension (vLLM)
  min_p: Annotated[float, pydantic.Field(ge=0, le=1)] = 0.0  # extension
  repetition_penalty: Annotated[float, pydantic.Field(gt=0)] = 1.0  # extension
  frequency_penalty: Annotated[float, pydantic.Field(ge=-2, le=2)] = 0.0
  presence_penalty: Annotated[float, pydantic.Field(ge=-2, le=2)] = 0.0
  # Choice i samples with seed + i, below 2**63.
  seed: Annotated[int, pydantic.Field(ge=0, lt=2 ** 63 - 16)] | None = None
  stop: StopText | Annotated[list[StopText], pydantic.Field(max_length=MAX_STOPS)] | None = None
  # {token id (as a string, OpenAI's JSON): bias added to its logit}
  logit_bias: Annotated[dict[Annotated[str, pydantic.Field(pattern=r"^\d{1,9}$")],
                             Annotated[float, pydantic.Field(ge=-100, le=100)]],
                        pydantic.Field(max_length=1024)] | None = None
  n: Annotated[int, pydantic.Field(ge=1, le=16)] = 1
  stream: bool = False
  # Extensions (vLLM's): no end before min_tokens, the end-of-sequence token as an ordinary
  # one, token ids that end the output.
  min_tokens: Annotated[int, pydantic.Field(ge=0, lt=2 ** 31)] = 0
  ignore_eos: bool = False
  stop_token_ids: Annotated[list[Annotated[int, pydantic.Field(ge=0, lt=2 ** 31)]],
                            pydantic.Field(max_length=64)] | None = None


class JsonSchemaFormat(pydantic.BaseModel):
  """OpenAI's `response_format.json_schema`: the schema the reply must validate against."""
  model_config = pydantic.ConfigDict(extra="ignore", populate_by_name=True)
  name: Annotated[Text, pydantic.Field(max_length=64)] = "response"
  description: Text | None = None
  schema_: dict[str, Any] = pydantic.Field(default_factory=dict, alias="schema")
  strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  type: Literal["text", "json_object", "json_schema"]
  json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(pydantic.BaseModel):
  """Extension (vLLM's `structured_outputs`): exactly one of a JSON schema (`json`, an
  object or its text), any JSON object, a regex, a Lark grammar or a list of choices."""
  model_config = pydantic.ConfigDict(extra="forbid", populate_by_name=True)
  json_: dict[str, Any] | Text | None = pydantic.Field(default=None, alias="json")
  json_object: bool | None = None
  regex: Text | None = None
  grammar: Text | None = None
  choice: Annotated[list[Text], pydantic.Field(min_length=1)] | None = None


class StructuredRequest(CommonRequest):
  """What constrains a request's output: OpenAI's `response_format`, or the extension
  `structured_outputs` (also spelled as vLLM's older `guided_json`, `guided_regex`,
  `guided_grammar`, `guided_choice`)."""
  response_format: ResponseFormat | None = None
  structured_outputs: StructuredOutputs | None = None
  guided_json: dict[str, Any] | Text | None = None
  guided_regex: Text | None = None
  guided_grammar: Text | None = None
  guided_choice: Annotated[list[Text], pydantic.Field(min_length=1)] | None = None


def grammar_spec(body: StructuredRequest, tool_spec=None):
  """The request's `grammar.GrammarSpec`, or None when its output is free text; APIError 400
  when it asks for two constraints or a malformed one. `tool_spec`: the grammar its
  tool_choice requires (`tool_calls.grammar_spec`), one more constraint."""
  from jaxllm.inference import grammar
  found = [("tool_choice", tool_spec.kind, tool_spec.source)] if tool_spec else []
  rf = body.response_format
  if rf is not None and rf.type == "json_object":
    found.append(("response_format", "json_object", None))
  elif rf is not None and rf.type == "json_schema":
    if rf.json_schema is None:
      raise APIError(400, "response_format of type json_schema needs a json_schema object",
                     param="response_format.json_schema")
    found.append(("response_format", "json_schema", rf.json_schema.schema_))
  so = body.structured_outputs
  pairs = [("guided_json", "json_schema", body.guided_json),
           ("guided_regex", "regex", body.guided_regex),
           ("guided_grammar", "lark", body.guided_grammar),
           ("guided_choice", "choice", body.guided_choice)]
  if so is not None:
    pairs += [("structured_outputs.json", "json_schema", so.json_),
              ("structured_outputs.json_object", "json_object", True if so.json_object else None),
              ("structured_outputs.regex", "regex", so.regex),
              ("structured_outputs.grammar", "lark", so.grammar),
              ("structured_outputs.choice", "choice", so.choice)]
  for param, kind, source in pairs:
    if source is None:
      continue
    if kind == "json_schema" and isinstance(source, str):
      try:
        source = json.loads(source)
      except json.JSONDecodeError as e:
        raise APIError(400, f"{param}: the schema is not valid JSON ({e})", param=param) from None
    found.append((param, kind, None if kind == "json_object" else source))
  if len(found) > 1:
    raise APIError(400, f"give one output constraint, not {len(found)} "
                   f"({', '.join(f[0] for f in found)})", param=found[1][0])
  if not found:
    return None
  param, kind, source = found[0]
  return param, grammar.GrammarSpec(kind, source)


TokenId = Annotated[int, pydantic.Field(ge=0, lt=2 ** 31)]
MAX_PROMPTS = 64  # prompts in one completions request (each with its n choices)


class CompletionRequest(StructuredRequest):
  # OpenAI's four forms: a text, texts, token ids, lists of token ids. A list of prompts
  # answers with n choices per prompt, choice p * n + j being prompt p's j-th.
  prompt: (Text | Annotated[list[Text], pydantic.Field(max_length=MAX_PROMPTS)] | list[TokenId]
           | Annotated[list[list[TokenId]], pydantic.Field(max_length=MAX_PROMPTS)])
  logprobs: Annotated[int, pydantic.Field(ge=0, le=5)] | None = None  # OpenAI's range
  # The prompt before the completion in each choice's text (and, with logprobs, its tokens'
  # logprobs: the first has none): what evaluation harnesses score answers with.
  echo: bool = False

  def prompts(self) -> list[str | list[int]]:
    """The request's prompts, one or many; APIError 400 for none or an empty one."""
    p = self.prompt
    many = (isinstance(p, list) and bool(p) and not isinstance(p[0], int))
    prompts = list(p) if many else [p]
    if not prompts or any(len(x) == 0 for x in prompts):
      raise APIError(400, "prompt is empty", param="prompt")
    return prompts


class ContentPart(pydantic.BaseModel):
  type: Literal["text"]
  text: Text


class FunctionCall(pydantic.BaseModel):
  name: Text
  arguments: Text  # JSON, as OpenAI sends it


class ToolCall(pydantic.BaseModel):
  """A call an earlier assistant turn made (sent back with the conversation)."""
  model_config = pydantic.ConfigDict(extra="ignore")
  id: Text | None = None
  type: Literal["function"] = "function"
  function: FunctionCall


class ChatMessage(pydantic.BaseModel):
  role: Text
  content: Text | list[ContentPart] | None = None
  tool_calls: Annotated[list[ToolCall], pydantic.Field(max_length=128)] | None = None
  tool_call_id: Text | None = None
  name: Text | None = None

  @pydantic.model_validator(mode="after")
  def _has_content(self):
    if self.content is None and not self.tool_calls:
      raise ValueError("a message needs content (an assistant's may have tool_calls instead)")
    return self

  def as_dict(self) -> dict:
    """The message as chat templates read it: content as one string; calls' arguments as
    objects (as Hugging Face templates expect) where they parse."""
    content = self.content
    if isinstance(content, list):
      content = "".join(part.text for part in content)
    out: dict[str, Any] = {"role": self.role, "content": content or ""}
    if self.tool_calls:
      calls = []
      for c in self.tool_calls:
        try:
          arguments = json.loads(c.function.arguments)
        except ValueError:
          arguments = c.function.arguments
        calls.append({"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": arguments}})
      out["tool_calls"] = calls
    if self.tool_call_id is not None:
      out["tool_call_id"] = self.tool_call_id
    if self.name is not None:
      out["name"] = self.name
    return out


class FunctionDefinition(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  name: Annotated[str, pydantic.Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
  description: Text | None = None
  parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
  strict: bool | None = None  # calls always follow the schema under a required tool_choice


class Tool(pydantic.BaseModel):
  type: Literal["function"]
  function: FunctionDefinition


class NamedFunction(pydantic.BaseModel):
  name: Text


class NamedToolChoice(pydantic.BaseModel):
  type: Literal["function"]
  function: NamedFunction


class ChatRequest(StructuredRequest):
  messages: list[ChatMessage]
  logprobs: bool = False
  top_logprobs: Annotated[int, pydantic.Field(ge=0, le=20)] | None = None
  tools: Annotated[list[Tool], pydantic.Field(max_length=128)] | None = None
  # none | auto (the default with tools) | required | {"type": "function", "function": {...}}
  tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
  parallel_tool_calls: bool = True

  def tool_list(self) -> list[dict]:
    return [t.model_dump(exclude_none=True) for t in self.tools or []]

  def effective_tool_choice(self):
    """"none" without tools, "auto" by default with them, else the request's (a dict for a
    named function); APIError 400 for a choice that needs tools it does not have."""
    choice = self.tool_choice
    if choice is None:
      return "auto" if self.tools else "none"
    if not self.tools and choice != "none":
      raise APIError(400, "tool_choice needs tools", param="tool_choice")
    return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


class TokenizeRequest(pydantic.BaseModel):
  """vLLM's /tokenize: a prompt's ids (with the model's BOS where it expects one, unless
  add_special_tokens is false) or a conversation's, rendered with the chat template."""
  model_config = pydantic.ConfigDict(extra="ignore")
  model: Text | None = None
  prompt: Text | None = None
  messages: list[ChatMessage] | None = None
  add_special_tokens: bool = True
  add_generation_prompt: bool = True

  @pydantic.model_validator(mode="after")
  def _one_input(self):
    if (self.prompt is None) == (self.messages is None):
      raise ValueError("give one of prompt and messages")
    return self


class DetokenizeRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  model: Text | None = None
  tokens: list[TokenId]


def validation_error(errors: list[dict]) -> APIError:
  """A 400 naming the first invalid field of a request that failed validation."""
  first = errors[0] if errors else {}
  if first.get("type") == "json_invalid":  # its "loc" is a character offset, not a field
    where = first.get("loc", ("body", "?"))[-1]
    reason = (first.get("ctx") or {}).get("error", "JSON decode error")
    return APIError(400, f"the request body is not valid JSON: {reason} at character {where}")
  param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
  return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param)


def sampling_params(body: CommonRequest, seed: int) -> sampling.SamplingParams:
  """The engine's sampling settings for one choice of a request (max_tokens defaults to 16)."""
  max_tokens = body.max_completion_tokens or body.max_tokens or 16
  stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
  try:
    return sampling.SamplingParams(
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty, seed=seed, max_tokens=max_tokens, stop=stop,
        logit_bias={int(t): b for t, b in (body.logit_bias or {}).items()},
        min_tokens=body.min_tokens, ignore_eos=body.ignore_eos,
        stop_token_ids=tuple(body.stop_token_ids or ()))
  except ValueError as e:
    raise APIError(400, str(e)) from None


def submit_error(error: ValueError, chat: bool) -> APIError:
  """What the engine's refusal of a prompt (bad ids, too long) becomes."""
  return APIError(400, str(error), param="messages" if chat else "prompt",
                  code="context_length_exceeded" if "exceeds the context" in str(error)
                  else None)


def finish_reason(request) -> str:
  """OpenAI's reasons, and "grammar_dead_end" for an output its grammar could not continue."""
  reason = request.finish_reason
  return reason if reason in ("length", "grammar_dead_end") else "stop"


class Responses:
  """Response objects of one server: its tokenizer decodes, its model name is reported."""

  def __init__(self, tokenizer, model_name: str):
    self.tok, self.model_name = tokenizer, model_name

  def text(self, request) -> str:
    """A finished request's text (cut at its stop string when one ended it)."""
    if request.finish_reason == "stop" and request.params.stop and request.text:
      return request.text
    return self.tok.decode(request.tokens)

  def logprobs(self, body, chat: bool, entries: list[Entry], offset: int = 0):
    """OpenAI's logprobs object for these tokens, or None when the request did not ask.
    `offset`: where the first token's text begins in the choice's text (completions'
    text_offset)."""
    if chat and body.logprobs:
      k = body.top_logprobs or 0
      return {"content": [
          {"token": self.tok.decode([t]), "logprob": lp, "bytes": None,
           "top_logprobs": [{"token": self.tok.decode([i]), "logprob": v, "bytes": None}
                            for i, v in (top or ())[:k]]}
          for t, lp, top in entries]}
    if not chat and body.logprobs is not None:
      k = body.logprobs
      ids = [t for t, _, _ in entries]
      return {"tokens": [self.tok.decode([t]) for t in ids],
              "token_logprobs": [lp for _, lp, _ in entries],
              "top_logprobs": [None if top is None else
                               {self.tok.decode([i]): v for i, v in top[:k]}
                               for _, _, top in entries] if k else None,
              "text_offset": text_offsets(self.tok, ids, offset)}
    return None

  @staticmethod
  def usage(prompts: list[list[int]], requests) -> dict:
    inp, out = sum(len(p) for p in prompts), sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out}

  def full(self, body, requests, rid: str, chat: bool, prompts: list[list[int]],
           tool_format: str | None = None, scores=None, echo: list[str] | None = None) -> dict:
    """The whole (non-streamed) response to a request whose choices have all finished; choice
    i answers `prompts[i // n]`. `tool_format`: the reply may hold tool calls in that format
    (`tool_calls.parse`). `scores`: each choice's `logprobs.Scored` of its prompt and tokens
    (their top alternatives, and the prompt's logprobs under `echo`), or None. `echo`: each
    prompt's text, written before its choices' completions."""
    choices = []
    per_prompt = len(requests) // len(prompts)
    for i, r in enumerate(requests):
      prompt = prompts[i // per_prompt]
      tokens = r.tokens + ([] if chat else ending(r))
      if scores is not None:
        entries = scored_entries(prompt, tokens, scores[i], echo=echo is not None)
      else:
        lps = r.logprobs + ([r.stop_logprob] if len(tokens) > len(r.tokens) else [])
        entries = list(zip(tokens, lps, [None] * len(tokens)))
      c: dict[str, Any] = {"index": i, "finish_reason": finish_reason(r),
                           "logprobs": self.logprobs(body, chat, entries)}
      if chat:
        c["message"] = {"role": "assistant", "content": self.text(r)}
        if tool_format is not None:
          from jaxllm.inference import tool_calls
          content, calls = tool_calls.parse(self.text(r), tool_format)
          if calls:
            c["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
            c["finish_reason"] = "tool_calls"
      else:
        c["text"] = (echo[i // per_prompt] if echo is not None else "") + self.text(r)
      choices.append(c)
    return {"id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": choices,
            "usage": self.usage(prompts, requests)}

  def tool_calls_chunk(self, rid: str, index: int, calls: list[dict]) -> str:
    """The server-sent event carrying choice `index`'s tool calls whole (OpenAI's delta
    shape: each call with its position, id, name and arguments)."""
    delta = {"tool_calls": [{"index": j, **call} for j, call in enumerate(calls)]}
    data = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": self.model_name,
            "choices": [{"index": index, "delta": delta, "finish_reason": None,
                         "logprobs": None}]}
    return f"data: {json.dumps(data)}\n\n"

  def chunk(self, body, rid: str, chat: bool, index: int, text: str, finish=None, tokens=(),
            logprobs=(), role: bool = False, entries: list[Entry] | None = None,
            offset: int = 0) -> str:
    """One server-sent event of a stream: new text of choice `index` (with its tokens'
    logprobs when asked: `tokens` and `logprobs`, or `entries`, the first at `offset` in the
    choice's text), its finish reason, or (chat, `role`) the opening assistant delta."""
    if chat:
      delta = ({"role": "assistant", "content": ""} if role
               else {"content": text} if text or finish is None else {})
      c = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
    else:
      c = {"index": index, "text": text, "finish_reason": finish, "logprobs": None}
    if entries is None and tokens:
      entries = list(zip(tokens, logprobs, [None] * len(tokens)))
    if entries:
      c["logprobs"] = self.logprobs(body, chat, entries, offset)
    data = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": [c]}
    return f"data: {json.dumps(data)}\n\n"


def ending(request) -> list[int]:
  """[the token that ended a request] (end of sequence or a stop token id), or []: a
  completion's logprobs end with it (as OpenAI's and vLLM's do; its text is not written), so a
  harness scoring `echo` answers with max_tokens=1 finds the generated token after the prompt
  even when the model would end there."""
  token = getattr(request, "stop_token", None)
  return [] if token is None else [token]


# One token of a logprobs object: (id, its logprob or None for a prompt's first token, its
# most likely alternatives [(id, logprob), ...] or None where they were not computed).
Entry = tuple[int, "float | None", "list[tuple[int, float]] | None"]


def scored_entries(prompt: list[int], tokens: list[int], scored, *, echo: bool) -> list[Entry]:
  """The entries of a choice from `scored` (`logprobs.Scored` of prompt + tokens): the
  generated tokens', after the prompt's own under `echo`."""
  seq = list(prompt) + list(tokens)
  lps = [None, *scored.token_logprobs]
  tops = [None, *scored.top]
  start = 0 if echo else len(prompt)
  return list(zip(seq[start:], lps[start:len(seq)], tops[start:len(seq)]))


def text_offsets(tokenizer, ids: list[int], offset: int = 0, context: int = 4) -> list[int]:
  """Where each token's text begins, counted from `offset`: each token adds what decoding it
  after the `context` tokens before it adds (so characters merged across tokens count once)."""
  out, at = [], offset
  for i, t in enumerate(ids):
    out.append(at)
    before = ids[max(0, i - context):i]
    at += len(tokenizer.decode([*before, t])) - len(tokenizer.decode(before))
  return out
