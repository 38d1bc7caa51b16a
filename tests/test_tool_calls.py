"""Tool calling (`jaxllm.inference.tool_calls`): each format's text parsed into OpenAI calls,
templates of each kind rendering tools and history, and the grammar of a required tool_choice
producing calls whose arguments validate (`jsonschema`) whatever tokens the model picks.

The templates below are this test's own minimal stand-ins for the two families' formats (the
tools listed, earlier calls and results in the family's syntax); the server's round trip with
the official client is in test_server.py.
"""

import json
import random

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from jaxllm.data import chat as chat_lib  # noqa: E402
from jaxllm.inference import grammar  # noqa: E402
from jaxllm.inference import tool_calls  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                       "properties": {"city": {"type": "string", "maxLength": 8},
                                      "unit": {"enum": ["C", "F"]}}}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {
            "type": "object", "additionalProperties": False, "required": ["a", "b"],
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                           "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}},
]

HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>\n{% for t in tools %}{{ t.function | tojson }}\n"
    "{% endfor %}</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", "
    "\"arguments\": {{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_TEMPLATE = (
    "{% if tools %}<|start_header_id|>user<|end_header_id|>\nGiven these functions, reply "
    "with {\"name\": function name, \"parameters\": its arguments}.\n{% for t in tools %}"
    "{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}{% for m in messages %}"
    "<|start_header_id|>{{ m.role }}<|end_header_id|>\n{% if m.tool_calls %}<|python_tag|>"
    "{% for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
    "{{ c.function.arguments | tojson }}}{% endfor %}{% else %}{{ m.content }}{% endif %}"
    "<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n")


class _Tok:
  bos_id, eos_id = -1, -1


def test_hermes_replies_parse_into_calls_and_text():
  text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
          '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
          '</tool_call>')
  content, calls = tool_calls.parse(text, "hermes")
  assert content == "Let me check."
  assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
      ("get_weather", {"city": "Oslo"}), ("add", {"a": 1, "b": 2})]
  assert len({c["id"] for c in calls}) == 2 and all(c["type"] == "function" for c in calls)
  # A reply cut before its closing tag still holds its call; one that is not JSON is text.
  assert tool_calls.parse('<tool_call>\n{"name": "add", "arguments": {}}', "hermes")[1]
  broken = "<tool_call>\n{not json}\n</tool_call>"
  assert tool_calls.parse(broken, "hermes") == (broken, [])
  assert tool_calls.parse("plain answer", "hermes") == ("plain answer", [])
  # What a reply that made calls looks like, written back for a template without tools.
  again = tool_calls.parse(tool_calls.hermes_text(calls), "hermes")[1]
  assert [c["function"] for c in again] == [c["function"] for c in calls]


def test_llama3_json_replies_parse_into_calls():
  text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}; '
          '{"name": "add", "parameters": {"a": 3, "b": 4}}')
  content, calls = tool_calls.parse(text, "llama3_json")
  assert content is None
  assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
      ("get_weather", {"city": "Rome"}), ("add", {"a": 3, "b": 4})]
  # A ";" inside an argument is the argument's, not a separator.
  semi = '{"name": "get_weather", "parameters": {"city": "a;b"}}'
  assert json.loads(tool_calls.parse(semi, "llama3_json")[1][0]["function"]["arguments"]) == {
      "city": "a;b"}
  for text in ('{"answer": 4}', "4", '{"name": "add", "parameters": [1]}', '{"name": "add"} x'):
    assert tool_calls.parse(text, "llama3_json") == (text, [])


def test_each_template_kind_renders_tools_and_history():
  """Templates that take `tools` render them (and earlier calls) in their own syntax; one
  that does not (SmolLM2's ChatML) gets a system prompt and the history as Hermes text."""
  assert tool_calls.template_format(HERMES_TEMPLATE) == ("hermes", True)
  assert tool_calls.template_format(LLAMA3_TEMPLATE) == ("llama3_json", True)
  smollm2 = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
             "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
  assert tool_calls.template_format(smollm2) == ("hermes", False)
  call = {"id": "c1", "type": "function",
          "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
  history = [{"role": "user", "content": "1 + 2?"},
             {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": "3", "tool_call_id": "c1"}]
  hermes = chat_lib.render(HERMES_TEMPLATE, history, _Tok(), tools=TOOLS)
  llama = chat_lib.render(LLAMA3_TEMPLATE, history, _Tok(), tools=TOOLS)
  plain = chat_lib.render(smollm2, tool_calls.plain_messages(history, TOOLS), _Tok())
  for prompt in (hermes, llama, plain):
    assert '"name": "get_weather"' in prompt and '"name": "add"' in prompt, prompt
  assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in hermes
  assert '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}' in llama
  assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>' in plain
  assert "<tool_response>\n3\n</tool_response>" in plain
  assert plain.startswith("<|im_start|>system\nYou can call functions.")


@pytest.fixture(scope="module")
def vocabulary(tiny_chat_model):
  from jaxllm.checkpoint import convert
  tok = convert.read_tokenizer(tiny_chat_model)
  return tok, grammar.Vocabulary(tok, tok.vocab_size)


@pytest.mark.parametrize("fmt", tool_calls.FORMATS)
def test_required_and_named_choices_always_yield_valid_calls(vocabulary, fmt):
  """Random walks through the grammar (any allowed token, as a random model at temperature 1
  picks): each reply parses into calls of the allowed tools whose arguments validate."""
  tok, vocab = vocabulary
  params = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
  choices = [("required", True), ("required", False),
             ({"type": "function", "function": {"name": "add"}}, True)]
  for choice, parallel in choices:
    spec = tool_calls.grammar_spec(TOOLS, choice, fmt, parallel=parallel)
    compiled = vocab.compile(spec)
    for seed in range(4):
      constraint, rng, out = vocab.constraint(compiled), random.Random(seed), []
      while not constraint.finished and len(out) < 600:
        mask = np.zeros(grammar.words(tok.vocab_size), np.int32)
        assert constraint.fill(mask)
        allowed = np.nonzero(grammar.unpack(mask[None], tok.vocab_size)[0])[0].tolist()
        if constraint.accepting and (rng.random() < 0.7 or allowed == [tok.eos_id]):
          break  # the model may end here
        t = rng.choice([a for a in allowed if a != tok.eos_id])
        assert constraint.consume(t)
        out.append(t)
      content, calls = tool_calls.parse(tok.decode(out), fmt)
      assert calls and content is None, tok.decode(out)
      assert parallel or len(calls) == 1
      for c in calls:
        name = c["function"]["name"]
        assert name in (params if choice == "required" else ["add"])
        jsonschema.validate(json.loads(c["function"]["arguments"]), params[name])


def test_bad_tools_and_choices_fail_in_one_line(vocabulary):
  _, vocab = vocabulary
  with pytest.raises(ValueError, match="names the function 'mul'"):
    tool_calls.grammar_spec(TOOLS, {"type": "function", "function": {"name": "mul"}}, "hermes")
  bad = [dict(TOOLS[0], function=dict(TOOLS[0]["function"], parameters={"type": "strin"}))]
  with pytest.raises(ValueError, match=r"tools\[0\]\.function\.parameters: .*Invalid type"):
    tool_calls.check_tools(bad, vocab)
  with pytest.raises(ValueError, match="repeat"):
    tool_calls.check_tools([TOOLS[1], TOOLS[1]], vocab)
  assert tool_calls.grammar_spec(TOOLS, "auto", "hermes") is None


def test_a_template_with_tools_renders_them_itself_in_the_server(tiny_chat_model):
  """A model whose template takes `tools` (the Hermes stand-in): the server hands it the
  tools and the history (calls' arguments as objects, as Hugging Face templates expect)
  instead of the system prompt, and a required choice returns a valid call."""
  pytest.importorskip("fastapi")
  from fastapi.testclient import TestClient
  import jaxllm
  from jaxllm.inference import engine as engine_lib
  from jaxllm.inference import server as server_lib
  model = jaxllm.load(tiny_chat_model)
  model.tokenizer.chat_template = HERMES_TEMPLATE
  engine = engine_lib.Engine(model.graphdef, model.params, engine_lib.EngineConfig(
      max_slots=2, num_pages=64, max_seq_len=512), eos_id=model.tokenizer.eos_id,
      decode=model.tokenizer.decode)
  engine.start()
  try:
    client = TestClient(server_lib.create_app(model, engine, model_name="m"))
    ask = [{"role": "user", "content": "1 + 2?"}]
    r = client.post("/v1/chat/completions", json={
        "model": "m", "messages": ask, "tools": TOOLS, "max_tokens": 40, "temperature": 0,
        "tool_choice": "required", "parallel_tool_calls": False}).json()
    (call,) = r["choices"][0]["message"]["tool_calls"]
    name = call["function"]["name"]
    jsonschema.validate(json.loads(call["function"]["arguments"]),
                        {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[name])
    assert r["usage"]["prompt_tokens"] == len(model.tokenizer.encode(
        chat_lib.render(HERMES_TEMPLATE, ask, model.tokenizer, tools=TOOLS)))
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": "3"}]
    second = client.post("/v1/chat/completions", json={
        "model": "m", "messages": history, "tools": TOOLS, "max_tokens": 4, "temperature": 0})
    assert second.status_code == 200, second.text
    # The template's own rendering, the call's arguments an object (tojson writes it as JSON,
    # not as a quoted string).
    as_template_reads = [ask[0], {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": name, "arguments": json.loads(
            call["function"]["arguments"])}}]},
        {"role": "tool", "content": "3", "tool_call_id": call["id"]}]
    prompt = chat_lib.render(HERMES_TEMPLATE, as_template_reads, model.tokenizer, tools=TOOLS)
    assert '"arguments": {' in prompt
    assert second.json()["usage"]["prompt_tokens"] == len(model.tokenizer.encode(prompt))
  finally:
    engine.shutdown()
