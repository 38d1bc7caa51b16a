"""Tool calling: OpenAI `tools` into a chat prompt, the model's reply out as `tool_calls`.

Each model family writes its calls its own way; the format is read off the chat template:
  hermes       `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per
               call (Qwen2.5 / Qwen3, Hermes, SmolLM3: templates that name `<tool_call>`);
  llama3_json  the reply is `{"name": ..., "parameters": {...}}` (Llama 3.1 to 3.3, whose
               templates name `<|python_tag|>`), several separated by `;`.
A template that takes `tools` renders them itself. One that does not (SmolLM2's) gets them in a
system message (`system_prompt`), with the Hermes format asked for, and earlier calls and tool
results written into the conversation as text in that format (`plain_messages`).

`tool_choice` "required" or a named function is enforced with the grammar engine
(`grammar_spec`: a Lark grammar whose calls are JSON under each tool's parameter schema), so
the reply always parses into calls whose arguments validate; "auto" parses what the model
wrote; "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from jaxllm.inference import grammar

FORMATS = ("hermes", "llama3_json")
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


def template_format(template: str | None) -> tuple[str, bool]:
  """(format, whether the template renders `tools` itself) for a chat template."""
  if not template or "tools" not in template:
    return "hermes", False
  if HERMES_OPEN in template:
    return "hermes", True
  if PYTHON_TAG in template or "parameters" in template:
    return "llama3_json", True
  return "hermes", True


def function_of(tool: dict) -> dict:
  """The `function` object of an OpenAI tool ({"type": "function", "function": {...}})."""
  return tool["function"]


def system_prompt(tools: list[dict]) -> str:
  """What a template without tool support is told: the tools as JSON and the call format."""
  listed = "\n".join(json.dumps(function_of(t)) for t in tools)
  return ("You can call functions. Their signatures, as JSON, are within <tools></tools>:\n"
          f"<tools>\n{listed}\n</tools>\n"
          "To call one, reply with a JSON object of its name and arguments within "
          "<tool_call></tool_call> tags:\n"
          '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
          "</tool_call>")


def hermes_text(calls: list[dict]) -> str:
  """OpenAI `tool_calls` as Hermes-format text (a reply that made them)."""
  blocks = []
  for call in calls:
    fn = call["function"]
    args = fn.get("arguments") or "{}"
    arguments = json.loads(args) if isinstance(args, str) else args
    blocks.append(f"{HERMES_OPEN}\n"
                  + json.dumps({"name": fn["name"], "arguments": arguments})
                  + f"\n{HERMES_CLOSE}")
  return "\n".join(blocks)


def plain_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
  """Messages for a template that knows nothing of tools: the tools' system prompt first
  (joined to the conversation's own system message; none without tools), assistant calls as
  Hermes text, tool results as `<tool_response>` blocks in a user turn."""
  out = [dict(m) for m in messages]
  if tools:
    prompt = system_prompt(tools)
    if out and out[0]["role"] == "system":
      out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
    else:
      out.insert(0, {"role": "system", "content": prompt})
  for m in out:
    if m["role"] == "assistant" and m.get("tool_calls"):
      text = hermes_text(m["tool_calls"])
      m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
    elif m["role"] == "tool":
      m["role"] = "user"
      m["content"] = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
    m.pop("tool_calls", None)
    m.pop("tool_call_id", None)
    m["content"] = m.get("content") or ""
  return out


def _call(name: str, arguments: Any) -> dict:
  return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
          "function": {"name": name, "arguments": json.dumps(arguments)}}


def _json_calls(text: str, key: str) -> list[dict] | None:
  """Calls from JSON objects with "name" and `key` (or "arguments"), else None."""
  try:
    value = json.loads(text)
  except ValueError:
    return None
  items = value if isinstance(value, list) else [value]
  calls = []
  for item in items:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
      return None
    args = item.get(key, item.get("arguments", {}))
    if not isinstance(args, dict):
      return None
    calls.append(_call(item["name"], args))
  return calls


def parse(text: str, fmt: str) -> tuple[str | None, list[dict]]:
  """(content, tool_calls) of a reply: the text outside the calls (None when nothing but
  calls) and OpenAI `tool_calls` (id, type, function name and arguments as a JSON string).
  A call that does not parse stays in the content: the reply is then plain text."""
  if fmt == "hermes":
    calls, kept, at = [], [], 0
    pattern = re.compile(re.escape(HERMES_OPEN) + r"(.*?)(?:" + re.escape(HERMES_CLOSE) + r"|$)",
                         re.S)
    for m in pattern.finditer(text):
      found = _json_calls(m.group(1).strip(), "arguments")
      if found is None:
        continue
      kept.append(text[at:m.start()])
      at = m.end()
      calls += found
    kept.append(text[at:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls
  if fmt == "llama3_json":
    body = text.strip()
    if body.startswith(PYTHON_TAG):
      body = body[len(PYTHON_TAG):].strip()
    # JSON objects one after another, `;` between them (read whole: a `;` inside an
    # argument's string is not a separator).
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
      try:
        value, end = decoder.raw_decode(body, at)
      except ValueError:
        return text, []
      found = _json_calls(json.dumps(value), "parameters")
      if found is None:
        return text, []
      calls += found
      at = end
      while at < len(body) and body[at] in "; \n\t":
        at += 1
    return (None, calls) if calls else (text, [])
  raise ValueError(f"tool format {fmt!r} is not one of {FORMATS}")


def call_marker(fmt: str) -> str:
  """Text at which a streamed reply may turn into a call: held back until the reply ends."""
  return HERMES_OPEN if fmt == "hermes" else "{"


def check_tools(tools: list[dict], vocabulary: grammar.Vocabulary) -> None:
  """ValueError naming the first tool whose parameters are not a JSON schema the grammar
  engine takes (`tools[i].function.parameters: ...`), or a repeated name."""
  names = [function_of(t)["name"] for t in tools]
  if len(set(names)) < len(names):
    raise ValueError(f"tools: function names repeat in {names}")
  for i, t in enumerate(tools):
    params = function_of(t).get("parameters") or {"type": "object"}
    try:
      vocabulary.compile(grammar.GrammarSpec("json_schema", params))
    except ValueError as e:
      raise ValueError(f"tools[{i}].function.parameters: {e}") from None


def grammar_spec(tools: list[dict], choice: str | dict, fmt: str, *,
                 parallel: bool = True) -> grammar.GrammarSpec | None:
  """The grammar that makes the reply calls: None for "auto" and "none"; for "required", one
  or more calls (one when not `parallel`) of any tool; for {"type": "function", "function":
  {"name": N}}, calls of N. ValueError for a name no tool has."""
  if choice in ("auto", "none", None):
    return None
  if choice == "required":
    chosen = tools
  else:
    name = choice["function"]["name"]
    chosen = [t for t in tools if function_of(t)["name"] == name]
    if not chosen:
      raise ValueError(f"tool_choice names the function {name!r}, which tools does not have "
                       f"({', '.join(function_of(t)['name'] for t in tools) or 'none'})")
  key = "parameters" if fmt == "llama3_json" else "arguments"
  schemas = [{"type": "object", "additionalProperties": False, "required": ["name", key],
              "properties": {"name": {"const": function_of(t)["name"]},
                             key: function_of(t).get("parameters") or {"type": "object"}}}
             for t in chosen]
  call = {"anyOf": schemas} if len(schemas) > 1 else schemas[0]
  call["x-guidance"] = grammar.JSON_OPTIONS
  if fmt == "hermes":
    block = f'"{HERMES_OPEN}\\n" call "\\n{HERMES_CLOSE}"'
    start = f'{block} ("\\n" {block})*' if parallel else block
  else:
    start = 'call ("; " call)*' if parallel else "call"
  return grammar.GrammarSpec("lark", f"start: {start}\ncall: %json {json.dumps(call)}")
