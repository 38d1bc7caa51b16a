"""The engine alone on 8 JSON-schema requests (bench serve's schema, temperature 0.7, 96 tokens
each): plain constrained decoding against grammar-checked proposals at k = 4, 2, 3. Prints each
run's wall time and engine stats, and whether its outputs equal plain decoding's.

  python tools/results/grammar-spec-2026-12-07/engine_k_sweep.py CHECKPOINT
"""
import sys
import time

from jaxllm import api
from jaxllm.bench.serve import JSON_SCHEMA
from jaxllm.inference import engine as engine_lib
from jaxllm.inference import grammar, sampling

model = api.load(sys.argv[1])
vocabulary = grammar.Vocabulary(model.tokenizer, model.config.vocab_size)
compiled = vocabulary.compile(grammar.GrammarSpec("json_schema", JSON_SCHEMA))
prompt = model.chat_ids([{"role": "user", "content": "List items as JSON."}])


def run(k):
  engine = engine_lib.Engine(model.graphdef, model.params, engine_lib.EngineConfig(
      max_slots=8, num_pages=256, page_size=16, speculative_k=k, max_seq_len=1024),
      eos_id=model.tokenizer.eos_id, decode=model.tokenizer.decode)
  requests = [engine.submit(prompt, sampling.SamplingParams(temperature=0.7, seed=i,
                                                            max_tokens=96),
                            constraint=vocabulary.constraint(compiled)) for i in range(8)]
  start = time.perf_counter()
  engine.run_until_idle()
  return engine, requests, time.perf_counter() - start


run(4), run(0)  # compile
engine, plain, seconds = run(0)
print("plain", seconds, dict(engine.stats))
for k in (4, 2, 3):
  run(k)
  engine, requests, seconds = run(k)
  print(f"k={k}", seconds, dict(engine.stats))
  print("identical", [r.tokens for r in plain] == [r.tokens for r in requests])
