"""A real server on 127.0.0.1, driven by the official `openai` client.

The model is a tiny random one with SmolLM2-135M's tokenizer and chat template
(`helpers.write_tiny_chat_model`): what these tests prove (the OpenAI protocol, streaming,
batching, replicas, errors) does not depend on trained weights, and the real model's
generation is checked against transformers in test_hf_parity.py.
"""

import concurrent.futures
import contextlib
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
import httpx  # noqa: E402

from jaxllm.inference import server as server_lib  # noqa: E402
from jaxllm.inference import generate as gen  # noqa: E402
from jaxllm.inference import logprobs  # noqa: E402
from jaxllm.inference import sampling  # noqa: E402
from tests.helpers import REPO  # noqa: E402

NAME = "smollm2"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _serving(path, **build):
  """(base url, openai client, engine, app) of a live server of checkpoint `path` on a free
  port."""
  sizes = dict(max_slots=8, page_size=16, num_pages=160, max_seq_len=320, prefill_chunk=64)
  app, engine = server_lib.build(path, model_name=NAME, **{**sizes, **build})
  port = _free_port()
  srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=srv.run, daemon=True)
  thread.start()
  while not srv.started:
    time.sleep(0.05)
  base = f"http://127.0.0.1:{port}"
  try:
    yield base, openai.OpenAI(base_url=f"{base}/v1", api_key="unused"), engine, app
  finally:
    srv.should_exit = True
    thread.join(timeout=30)
    engine.shutdown()


@pytest.fixture(scope="module")
def server(tiny_chat_model):
  import jaxllm
  with _serving(tiny_chat_model) as (base, client, engine, app):
    model = jaxllm.load(tiny_chat_model)
    yield base, client, model, engine, app, tiny_chat_model


def _metrics(base):
  text = httpx.get(f"{base}/metrics").text
  return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
          if line and not line.startswith("#")}


def _wait_idle(base, engine):
  for _ in range(200):
    m = _metrics(base)
    if m["jaxllm_active_slots"] == 0 and m["jaxllm_queue_depth"] == 0:
      break
    time.sleep(0.05)
  assert m["jaxllm_active_slots"] == 0
  # Only the prefix cache still holds pages.
  assert m["jaxllm_pages_in_use"] == m["jaxllm_prefix_cached_pages"]


def test_models_health_metrics(server):
  base, client, _, _, _, _ = server
  assert [m.id for m in client.models.list().data] == [NAME]
  assert httpx.get(f"{base}/health").json() == {"status": "ok"}
  m = _metrics(base)
  assert {"jaxllm_queue_depth", "jaxllm_active_slots", "jaxllm_pages_in_use",
          "jaxllm_tokens_per_second", "jaxllm_time_to_first_token_seconds_count"} <= set(m)


def test_greedy_chat_and_completion_equal_jaxllm_generate(server):
  base, client, model, engine, _, _ = server
  question = "What is the capital of France?"
  ids = model.chat_ids([{"role": "user", "content": question}])
  reference = model.generate([ids], max_tokens=12, temperature=0.0, details=True)[0]
  want = reference.text
  chat = client.chat.completions.create(model=NAME, max_tokens=12, temperature=0,
                                        messages=[{"role": "user", "content": question}])
  assert chat.choices[0].message.content == want
  assert chat.choices[0].finish_reason == reference.finish_reason
  assert chat.usage.completion_tokens == len(reference.tokens)
  assert chat.usage.prompt_tokens == len(ids)
  stream = client.chat.completions.create(model=NAME, max_tokens=12, temperature=0,
                                          stream=True,
                                          messages=[{"role": "user", "content": question}])
  assert "".join(c.choices[0].delta.content or "" for c in stream) == want

  prompt = "def fibonacci(n):"
  want = model.generate(prompt, max_tokens=16, temperature=0.0)
  done = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
  assert done.choices[0].text == want
  streamed = client.completions.create(model=NAME, prompt=prompt, max_tokens=16,
                                       temperature=0, stream=True)
  chunks = list(streamed)
  assert "".join(c.choices[0].text for c in chunks) == want
  assert chunks[-1].choices[0].finish_reason in ("length", "stop")
  _wait_idle(base, engine)


def test_seeded_sampling_n_logprobs_and_stop(server):
  base, client, model, engine, _, _ = server
  kw = dict(model=NAME, prompt="import os\n", max_tokens=10, temperature=0.9, top_p=0.95,
            seed=7, n=2, logprobs=1)
  a, b = client.completions.create(**kw), client.completions.create(**kw)
  assert [c.text for c in a.choices] == [c.text for c in b.choices]
  # Choice i samples with seed + i, exactly as the library does.
  ids = model.prompt_ids("import os\n")
  want = [gen.generate_requests(model.graphdef, model.params, [ids], [sampling.SamplingParams(
      temperature=0.9, top_p=0.95, seed=seed, max_tokens=10)], eos_id=model.tokenizer.eos_id)[0]
          for seed in (7, 8)]
  assert want[0].tokens != want[1].tokens  # so equal choices below would be a bug
  for choice, w in zip(a.choices, want):
    assert choice.logprobs.token_logprobs == pytest.approx(w.logprobs, abs=1e-4)
    assert choice.text == model.tokenizer.decode(w.tokens)
  full = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=20,
                                   temperature=0).choices[0].text
  stop = full[5:8]
  cut = client.completions.create(model=NAME, prompt="def f(x):", max_tokens=20, temperature=0,
                                  stop=[stop])
  assert cut.choices[0].text == full[:full.index(stop)]
  assert cut.choices[0].finish_reason == "stop"
  streamed = "".join(c.choices[0].text for c in client.completions.create(
      model=NAME, prompt="def f(x):", max_tokens=20, temperature=0, stop=[stop], stream=True))
  assert streamed == cut.choices[0].text
  _wait_idle(base, engine)


def test_echo_scores_prompts_and_the_tokenizer_endpoints_round_trip(server):
  """echo with logprobs (what evaluation harnesses send): each prompt's text and token
  logprobs before its completion, for a batch of prompts (texts) and a prompt of ids. Each prompt
  token's logprob equals the engine's own (paged prefill and decode) for that token forced by
  logit_bias; each greedy token is its position's top alternative. The tokenizer endpoints
  (vLLM's) are the model's tokenizer."""
  base, client, model, engine, _, _ = server
  text = "def add(a, b):\n    return"
  ids = httpx.post(f"{base}/tokenize", json={"prompt": text, "add_special_tokens": False}
                   ).json()["tokens"]
  assert ids == model.tokenizer.encode(text)
  assert httpx.post(f"{base}/detokenize", json={"tokens": ids}).json() == {"prompt": text}
  chat = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
  assert chat.json()["tokens"] == model.chat_ids([{"role": "user", "content": "hi"}])
  history = httpx.post(f"{base}/tokenize", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "add_generation_prompt": False})
  assert history.json()["tokens"] == model.chat_ids([{"role": "user", "content": "hi"}],
                                                    add_generation_prompt=False)
  assert len(history.json()["tokens"]) < len(chat.json()["tokens"])
  info = httpx.get(f"{base}/tokenizer_info").json()
  assert info["eos_token"] == model.tokenizer.decode([model.tokenizer.eos_id])
  assert info["chat_template"] == model.tokenizer.chat_template
  bad = httpx.post(f"{base}/detokenize", json={"tokens": [model.config.vocab_size]})
  assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"

  out = client.completions.create(model=NAME, prompt=[text, "import os"], max_tokens=3,
                                  temperature=0, echo=True, logprobs=2)
  assert len(out.choices) == 2
  first = out.choices[0]
  assert first.text.startswith(text)
  lp = first.logprobs
  assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
  assert lp.top_logprobs[0] is None and all(len(t) == 2 for t in lp.top_logprobs[1:])
  assert lp.text_offset[:2] == [0, len(model.tokenizer.decode(ids[:1]))]
  for k in (3, len(ids) - 1):  # prompt token k, forced after ids[:k]
    forced = client.completions.create(model=NAME, prompt=ids[:k], max_tokens=1, temperature=0,
                                       logit_bias={str(ids[k]): 100}, logprobs=0)
    assert forced.choices[0].logprobs.token_logprobs[0] == pytest.approx(
        lp.token_logprobs[k], abs=1e-4)
  for t in range(len(ids), len(ids) + 3):  # greedy: each generated token is the top one
    assert lp.top_logprobs[t][lp.tokens[t]] == pytest.approx(max(lp.top_logprobs[t].values()))
  plain = client.completions.create(model=NAME, prompt="import os", max_tokens=3, temperature=0,
                                    logprobs=0).choices[0]
  assert out.choices[1].text == "import os" + plain.text
  assert out.choices[1].logprobs.token_logprobs[-3:] == pytest.approx(
      plain.logprobs.token_logprobs, abs=1e-4)
  assert out.usage.prompt_tokens == len(ids) + len(model.prompt_ids("import os"))
  # A choice ended by the end-of-sequence token still reports it (text aside): a harness
  # scoring answers with max_tokens=1 reads the prompt's logprobs up to the last entry.
  eos = model.tokenizer.eos_id
  ended = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0,
                                    echo=True, logprobs=1, logit_bias={str(eos): 100})
  assert ended.choices[0].finish_reason == "stop" and ended.choices[0].text == text
  assert ended.choices[0].logprobs.tokens[-1] == model.tokenizer.decode([eos])
  assert ended.choices[0].logprobs.token_logprobs[:-1] == pytest.approx(
      lp.token_logprobs[:len(ids)], abs=1e-4)
  # Streamed (the prompt as ids): the prompt (with its logprobs) first, then the completion.
  events = list(client.completions.create(model=NAME, prompt=ids, max_tokens=3, temperature=0,
                                          echo=True, logprobs=1, stream=True))
  assert events[0].choices[0].text == text
  assert events[0].choices[0].logprobs.token_logprobs == pytest.approx(
      lp.token_logprobs[:len(ids)], abs=1e-4)
  assert "".join(e.choices[0].text for e in events) == first.text
  _wait_idle(base, engine)


def test_bad_requests_get_openai_errors(server):
  base, client, _, _, app, _ = server
  with pytest.raises(openai.BadRequestError) as e:
    client.completions.create(model=NAME, prompt="x " * 400, max_tokens=10)
  assert e.value.code == "context_length_exceeded"
  with pytest.raises(openai.BadRequestError, match="temperature: .* greater than or equal to 0"):
    client.completions.create(model=NAME, prompt="x", temperature=-1)
  with pytest.raises(openai.BadRequestError, match="n: .* greater than or equal to 1"):
    client.completions.create(model=NAME, prompt="x", n=0)
  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model="gpt-4", prompt="x")
  assert e.value.code == "model_not_found"
  bad = httpx.post(f"{base}/v1/completions", json={"model": NAME})
  assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


HOSTILE = [  # (raw JSON body of /v1/completions, what it tries)
    b'{"model": "smollm2", "prompt": "\\udcff"}',  # lone surrogate
    b'{"model": "smollm2", "prompt": "hi", "stop": ["\\ud800"]}',
    b'{"model": "\\udcff", "prompt": "hi"}',
    b'{"model": "smollm2", "prompt": [100000000000000000000000]}',
    b'{"model": "smollm2", "prompt": [-1]}',
    # Beyond int32, which the engine's step arrays hold: refused, not an engine crash.
    b'{"model": "smollm2", "prompt": "hi", "top_k": 494844886951643}',
    b'{"model": "smollm2", "prompt": "hi", "max_tokens": 494844886951643}',
    b'{"model": "smollm2", "prompt": []}',
    b'{"model": "smollm2", "prompt": "hi", "max_tokens": -3}',
    b'{"model": "smollm2", "prompt": "hi", "max_tokens": 100000000000000000000}',
    b'{"model": "smollm2", "prompt": "hi", "seed": 100000000000000000000000}',
    b'{"model": "smollm2", "prompt": "hi", "seed": -5}',
    b'{"model": "smollm2", "prompt": "hi", "top_k": -2}',
    b'{"model": "smollm2", "prompt": "hi", "top_p": 1e309}',
    b'{"model": "smollm2", "prompt": "hi", "temperature": NaN}',
    b'{"model": "smollm2", "prompt": "hi", "logprobs": -1}',
    b'{"model": "smollm2", "prompt": "hi", "n": 100000000000000000000}',
    b'{"model": "smollm2", "prompt": "hi", "stop": [' + b", ".join(b'"%d"' % i for i in range(17))
    + b']}',  # over MAX_STOPS
    b'{"model": "smollm2", "prompt": [[1, 2], []]}',  # an empty prompt among many
    b'{"model": "smollm2", "prompt": [[1, 2], "hi"]}',  # ids and text mixed
    b'{"model": "smollm2", "prompt": [' + b", ".join([b'"x"'] * 65) + b']}',  # over MAX_PROMPTS
    b'{"model": "smollm2", "prompt": "hi", "stop": [""]}',
    b'{"model": "smollm2", "prompt": {"a": 1}}',
    b'{"model": "smollm2", "prompt": "hi", "logit_bias": {"99999999": 5}}',  # past the vocab
    b'{"model": "smollm2", "prompt": "hi", "logit_bias": {"x": 5}}',
    b'{"model": "smollm2", "prompt": "hi", "logit_bias": {"5": 100.5}}',
    b'{"model": "smollm2", "prompt": "hi"',  # truncated JSON
    b'[1, 2]',
]


def test_hostile_requests_get_4xx_in_openai_shape(server):
  base, *_ = server
  for body in HOSTILE:
    r = httpx.post(f"{base}/v1/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=120)
    assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}, body
    if body.endswith(b'"hi"'):  # the truncated one: said so, and no field blamed
      assert r.json()["error"]["message"].startswith("the request body is not valid JSON: ")
      assert r.json()["error"]["param"] is None
  chat = httpx.post(f"{base}/v1/chat/completions", content=(
      b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\udcff"}]}'),
      headers={"content-type": "application/json"})
  assert chat.status_code == 400 and "surrogate" in chat.json()["error"]["message"]
  assert server[3].failure is None  # the engine survived them all


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 3}}}


def test_structured_output_through_the_openai_client(server):
  """response_format (json_schema on chat, json_object on completions), the extension
  (`structured_outputs`, vLLM's `guided_*`), streamed and not, with n > 1 at temperature 1:
  every reply validates (the `jsonschema` library) or matches, and a stream's text is the
  whole response's."""
  jsonschema = pytest.importorskip("jsonschema")
  import json
  import re
  _, client, *_ = server
  messages = [{"role": "user", "content": "Describe a person as JSON."}]
  fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                "strict": True}}
  out = client.chat.completions.create(model=NAME, messages=messages, response_format=fmt,
                                       max_tokens=80, temperature=1.0, seed=5, n=4)
  for choice in out.choices:
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)
  greedy = dict(model=NAME, messages=messages, response_format=fmt, max_tokens=80,
                temperature=0)
  whole = client.chat.completions.create(**greedy).choices[0].message.content
  streamed = "".join(c.choices[0].delta.content or "" for c in
                     client.chat.completions.create(**greedy, stream=True))
  assert streamed == whole and json.loads(whole)
  obj = client.completions.create(model=NAME, prompt="{", max_tokens=60, temperature=0,
                                  extra_body={"response_format": {"type": "json_object"}})
  assert obj.choices[0].finish_reason == "length" or isinstance(
      json.loads(obj.choices[0].text), dict), obj.choices[0].text
  # [0-9], not \d: the grammar engine's \d is Unicode's digits, newer tables than Python's re
  # (a random model at temperature 1 draws Garay digits, U+10D40, that Python 3.12 does not
  # count as digits).
  ip = client.completions.create(model=NAME, prompt="IP:", max_tokens=30, temperature=1.0, n=3,
                                 extra_body={"structured_outputs": {
                                     "regex": r"10\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}"}})
  assert all(re.fullmatch(r"10\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}", c.text) for c in ip.choices)
  pick = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10,
                                        extra_body={"guided_choice": ["left", "right"]})
  assert pick.choices[0].message.content in ("left", "right")
  # logit_bias: +100 on one token forces it at every step, at temperature 1 too
  forced = client.completions.create(model=NAME, prompt="x", max_tokens=4, temperature=1.0,
                                     logit_bias={"1000": 100})
  assert forced.choices[0].text == server[2].tokenizer.decode([1000] * 4)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 12}}}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["a", "b"],
        "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                       "b": {"type": "integer", "minimum": 0, "maximum": 999}}}}}


def test_tool_calls_through_the_openai_client(server):
  """SmolLM2's template takes no tools: they go in a system prompt, the Hermes format. A
  required or named tool_choice always returns calls whose arguments validate (T=1, n=3,
  streamed and not: the stream's deltas assemble into the whole response's calls); "none"
  returns text; a second turn with the call and its result is answered."""
  jsonschema = pytest.importorskip("jsonschema")
  import json
  _, client, *_ = server
  params = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
  messages = [{"role": "user", "content": "What is the weather in Oslo?"}]
  out = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER, ADD],
                                       tool_choice="required", temperature=1.0, seed=3, n=3,
                                       max_tokens=60, parallel_tool_calls=False)
  for choice in out.choices:
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), params[call.function.name])
  named = dict(model=NAME, messages=messages, tools=[WEATHER, ADD], max_tokens=60,
               temperature=0, tool_choice={"type": "function", "function": {"name": "add"}})
  whole = client.chat.completions.create(**named).choices[0]
  assert whole.finish_reason == "tool_calls"
  assert {c.function.name for c in whole.message.tool_calls} == {"add"}
  deltas, finish = [], None
  for chunk in client.chat.completions.create(**named, stream=True):
    deltas += chunk.choices[0].delta.tool_calls or []
    finish = chunk.choices[0].finish_reason or finish
  assert finish == "tool_calls"
  assert [(d.function.name, d.function.arguments) for d in deltas] == [
      (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
  plain = client.chat.completions.create(model=NAME, messages=messages, tools=[WEATHER],
                                         tool_choice="none", max_tokens=8, temperature=0)
  assert plain.choices[0].message.tool_calls is None
  assert plain.choices[0].message.content == client.chat.completions.create(
      model=NAME, messages=messages, max_tokens=8, temperature=0).choices[0].message.content
  call = whole.message.tool_calls[0]
  second = client.chat.completions.create(
      model=NAME, tools=[WEATHER, ADD], max_tokens=8, temperature=0,
      messages=messages + [
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": call.id, "type": "function",
               "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
          {"role": "tool", "tool_call_id": call.id, "content": "12 degrees, rain"}])
  assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


BAD_TOOLS = [  # (extra chat request fields, what the 400's message says)
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}},
     "names the function 'add'"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [dict(WEATHER, function=dict(WEATHER["function"], parameters={"type": "x"}))]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "repeat"),
    ({"tools": [dict(WEATHER, function=dict(WEATHER["function"], name="no spaces"))]},
     "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "one output constraint"),
    ({"messages": [{"role": "user"}]}, "needs content"),
]


def test_bad_tools_get_a_400_naming_the_problem(server):
  base, *_ = server
  for extra, reason in BAD_TOOLS:
    body = {"model": NAME, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
            **extra}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, (extra, r.status_code, r.text)
    assert reason in r.json()["error"]["message"], (reason, r.text)


BAD_CONSTRAINTS = [  # (extra request fields, what the 400's message says)
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
     "Invalid type: strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "not": {"type": "string"}}}}}, "Unimplemented keys"),
    ({"response_format": {"type": "json_schema"}}, "needs a json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "a(b"}}, "unclosed group"),
    ({"structured_outputs": {"grammar": "start: nothing"}}, "unknown name"),
    ({"structured_outputs": {"json": "{not json"}}, "not valid JSON"),
    ({"structured_outputs": {"yaml": "x"}}, "structured_outputs.yaml"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "one output constraint"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}}}},
     "at most"),
]


def test_bad_constraints_get_a_400_naming_the_problem(server):
  base, *_ = server
  for extra, reason in BAD_CONSTRAINTS:
    for path, body in (("completions", {"prompt": "hi"}),
                       ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
      r = httpx.post(f"{base}/v1/{path}", json={"model": NAME, "max_tokens": 4, **body, **extra},
                     timeout=60)
      assert r.status_code == 400, (extra, r.status_code, r.text)
      assert reason in r.json()["error"]["message"], (reason, r.text)
  assert server[3].failure is None


def test_api_key(server):
  from fastapi.testclient import TestClient
  _, _, model, engine, _, _ = server
  guarded = TestClient(server_lib.create_app(model, engine, model_name=NAME, api_key="s3cret"))
  assert guarded.get("/v1/models").status_code == 401
  assert guarded.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
  ok = guarded.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
  assert ok.status_code == 200
  assert guarded.get("/health").status_code == 200


def test_default_name_drops_gguf_and_the_file_name_stays_an_alias(server):
  from fastapi.testclient import TestClient
  _, _, model, engine, _, _ = server
  assert server_lib.default_model_name("/m/SmolLM2-135M-Instruct.Q4_1.gguf") == (
      "SmolLM2-135M-Instruct.Q4_1")
  assert server_lib.default_model_name("runs/tiny/") == "tiny"
  client = TestClient(server_lib.create_app(model, engine, model_name="smol",
                                            aliases=("smol.gguf",)))
  assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["smol"]
  for name in ("smol", "smol.gguf"):
    r = client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "smol", r.text
  assert client.post("/v1/completions", json={"model": "other", "prompt": "hi"}).status_code == 404


PROMPTS_64 = [f"def function_{i}(x):\n    return x" + " +" * (i % 7) for i in range(64)]


@pytest.fixture(scope="module")
def want_64(server):
  """Greedy 8-token continuations of PROMPTS_64 by `generate` on one device."""
  model = server[2]
  want = gen.generate_requests(model.graphdef, model.params,
                               [model.prompt_ids(p) for p in PROMPTS_64],
                               [sampling.SamplingParams(max_tokens=8)] * 64,
                               eos_id=model.tokenizer.eos_id)
  return [model.tokenizer.decode(w.tokens) for w in want]


def _stream_64(client):
  def one(i):
    stream = client.completions.create(model=NAME, prompt=PROMPTS_64[i], max_tokens=8,
                                       temperature=0, stream=True)
    return "".join(c.choices[0].text for c in stream)

  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    return list(pool.map(one, range(64)))


def test_64_concurrent_streams_and_disconnects(server, want_64):
  base, client, model, engine, _, _ = server
  assert _stream_64(client) == want_64
  _wait_idle(base, engine)

  # A client that hangs up mid-stream cancels its request and frees its pages.
  before = _metrics(base)["jaxllm_generated_tokens_total"]
  with httpx.stream("POST", f"{base}/v1/completions",
                    json={"model": NAME, "prompt": "Once upon a time", "max_tokens": 200,
                          "temperature": 0, "stream": True}) as r:
    for line in r.iter_lines():
      if line.startswith("data:"):
        break
  _wait_idle(base, engine)
  assert _metrics(base)["jaxllm_generated_tokens_total"] - before < 200


def test_streaming_server_generates_past_its_context(server):
  """sink_tokens / stream_window (serve's flags): a 64-token context serves a 100-token greedy
  completion, each request in the same 4 pages, and the text is jaxllm.generate's under the
  same streaming settings (the contiguous cache, checked against a reference decoder)."""
  model = server[2]
  prompt = "1, 2, 3, 4, 5,"
  with _serving(server[5], max_slots=2, num_pages=None, max_seq_len=64, prefill_chunk=16,
                sink_tokens=4, stream_window=32) as (_, client, engine, _):
    assert engine.max_pages == 4 and engine.allocator.num_pages == 8  # 4 + 32 + 15 slots
    out = client.completions.create(model=NAME, prompt=prompt, max_tokens=100, temperature=0)
  assert out.usage.completion_tokens == 100 and out.choices[0].finish_reason == "length"
  want = model.generate(prompt, max_tokens=100, sink_tokens=4, stream_window=32)
  assert out.choices[0].text == want


def test_serve_cli_reports_bad_checkpoints_in_one_line():
  bad = subprocess.run([sys.executable, "-m", "jaxllm.serve", "--checkpoint=/no/such/dir"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip() == "error: no such checkpoint: /no/such/dir"


def test_streamed_logprobs_equal_the_whole_response(server):
  """logprobs=0 (chosen tokens only) comes back streamed exactly as it does unstreamed."""
  _, client, _, _, _, _ = server
  kw = dict(model=NAME, prompt="for i in range(", max_tokens=6, temperature=0, logprobs=0)
  whole = client.completions.create(**kw).choices[0].logprobs.token_logprobs
  streamed = [lp for c in client.completions.create(stream=True, **kw)
              if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
  assert len(whole) == 6 and streamed == pytest.approx(whole, abs=1e-6)


def test_two_tensor_parallel_replicas_serve_64_streams(server, want_64):
  # 2 replicas x tensor=3 (6 of the 8 devices): every output equals one device's, both
  # replicas take requests, and every page comes back.
  model = server[2]
  with _serving(server[5], mesh="tensor=3", replicas=2) as (base, client, engine, _):
    assert [e.mesh.devices.size for e in engine.engines] == [3, 3]
    assert _stream_64(client) == want_64
    assert min(engine.routed) >= 16, engine.routed
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=8,
        temperature=0)
    ids = model.chat_ids([{"role": "user", "content": "Name a colour."}])
    assert chat.choices[0].message.content == model.generate([ids], max_tokens=8,
                                                             details=True)[0].text
    # Prompt logprobs come from replica 0's weights, on its mesh: the same as one device's.
    echoed = client.completions.create(model=NAME, prompt=ids, max_tokens=1, temperature=0,
                                       echo=True, logprobs=1).choices[0].logprobs
    single = logprobs.score(model.graphdef, model.params, [ids], max_len=len(ids))[0]
    assert echoed.token_logprobs[1:len(ids)] == pytest.approx(single.token_logprobs, abs=1e-4)
    _wait_idle(base, engine)
    for e in engine.engines:
      m = e.metrics()
      assert m["pages_in_use"] == m["prefix_cached_pages"] and m["active_slots"] == 0


def test_an_engine_failure_answers_500_instead_of_hanging(tiny_chat_model, monkeypatch):
  """A step that raises (a lost device, a compiler crash) ends every request with an
  OpenAI-shaped 500, refuses later ones at once, and turns /health to 503."""
  with _serving(tiny_chat_model, max_slots=2) as (base, client, engine, _):
    def lost_device():
      raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "_decode_step", lost_device)
    client = client.with_options(max_retries=0, timeout=60)
    for stream in (False, True, False):  # the first fails in the loop, the others at submit
      with pytest.raises(openai.APIError) as e:
        out = client.completions.create(model=NAME, prompt="hi", max_tokens=4, stream=stream)
        list(out) if stream else None
      assert "the engine failed: RuntimeError('device lost')" in str(e.value), e.value
    health = httpx.get(f"{base}/health")
    assert health.status_code == 503 and health.json()["status"] == "failed"
