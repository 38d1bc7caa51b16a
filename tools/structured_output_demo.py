"""Structured output and tool calling end to end: a live server of a checkpoint
(SmolLM2-135M-Instruct by default), the official openai client, a JSON-schema request at
temperature 0.7 several times, each reply validated by the `jsonschema` library; the
extension's regex and choice; a two-turn tool-calling conversation.

  python tools/structured_output_demo.py [CHECKPOINT] [--n=8]

Prints each reply and, last, one JSON line: {"requests", "valid", "finish_reasons", ...}.
"""

import argparse
import json
import re
import socket
import sys
import threading
import time

SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["city", "country", "population", "landmarks"],
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"type": "string", "maxLength": 40},
        "population": {"type": "integer", "minimum": 0},
        "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40},
                      "maxItems": 3}}}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("checkpoint", nargs="?")
  parser.add_argument("--n", type=int, default=8)
  args = parser.parse_args()
  import jsonschema
  import openai
  import uvicorn
  from jaxllm.inference import server as server_lib
  path = args.checkpoint
  if path is None:
    from jaxllm.fetch import fetch
    path = fetch("smollm2-135m")
  app, engine = server_lib.build(path, model_name="m", max_slots=8, max_seq_len=1024)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  threading.Thread(target=server.run, daemon=True).start()
  while not server.started:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
  messages = [{"role": "system", "content": "You answer with JSON only."},
              {"role": "user", "content": "Describe Paris: its country, population and up to "
                                          "three landmarks."}]
  start = time.perf_counter()
  out = client.chat.completions.create(
      model="m", messages=messages, temperature=0.7, seed=0, n=args.n, max_tokens=160,
      response_format={"type": "json_schema",
                       "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}})
  seconds = time.perf_counter() - start
  valid = 0
  for c in out.choices:
    print(f"[{c.finish_reason}] {c.message.content}")
    try:
      jsonschema.validate(json.loads(c.message.content), SCHEMA)
      valid += 1
    except (ValueError, jsonschema.ValidationError) as e:
      print(f"  invalid: {str(e).splitlines()[0]}")
  free = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                        max_tokens=60).choices[0].message.content
  print(f"[unconstrained, greedy] {free!r}")
  date = client.chat.completions.create(
      model="m", max_tokens=20, temperature=0,
      messages=[{"role": "user", "content": "When did the Eiffel Tower open? A date please."}],
      extra_body={"structured_outputs": {"regex": r"\d{4}-\d{2}-\d{2}"}}).choices[0]
  print(f"[regex \\d{{4}}-\\d{{2}}-\\d{{2}}] {date.message.content}")
  pick = client.chat.completions.create(
      model="m", max_tokens=5, temperature=0,
      messages=[{"role": "user", "content": "Is Paris in France? Answer yes or no."}],
      extra_body={"guided_choice": ["yes", "no"]}).choices[0]
  print(f"[choice yes/no] {pick.message.content}")
  # Tool calling over two turns: the model's own choice ("auto"), then a required call, its
  # result sent back, and the model's answer.
  tools = [{"type": "function", "function": {
      "name": "get_weather", "description": "The current weather in a city",
      "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                     "properties": {"city": {"type": "string", "maxLength": 40}}}}}]
  ask = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
  auto = client.chat.completions.create(model="m", messages=ask, tools=tools, temperature=0,
                                        max_tokens=60).choices[0]
  print(f"[tools, auto] finish {auto.finish_reason}: "
        f"{auto.message.tool_calls or auto.message.content!r}")
  turn1 = client.chat.completions.create(model="m", messages=ask, tools=tools, temperature=0,
                                         tool_choice="required", max_tokens=60).choices[0]
  call = turn1.message.tool_calls[0]
  print(f"[tools, required] finish {turn1.finish_reason}: {call.function.name}"
        f"({call.function.arguments})")
  turn2 = client.chat.completions.create(
      model="m", tools=tools, temperature=0, max_tokens=60,
      messages=ask + [{"role": "assistant", "content": None, "tool_calls": [
          {"id": call.id, "type": "function", "function": {
              "name": call.function.name, "arguments": call.function.arguments}}]},
          {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 14, "sky": "rain"}'}]
  ).choices[0]
  print(f"[tools, turn 2] finish {turn2.finish_reason}: {turn2.message.content!r}")
  server.should_exit = True
  engine.shutdown()
  print(json.dumps({"checkpoint": path, "requests": len(out.choices), "valid": valid,
                    "finish_reasons": [c.finish_reason for c in out.choices],
                    "seconds": round(seconds, 1),
                    "regex_matches": bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}",
                                                       date.message.content)),
                    "choice": pick.message.content, "tool_auto": auto.finish_reason,
                    "tool_call": [call.function.name, json.loads(call.function.arguments)],
                    "turn2": turn2.finish_reason}))
  return 0 if valid == len(out.choices) else 1


if __name__ == "__main__":
  sys.exit(main())
