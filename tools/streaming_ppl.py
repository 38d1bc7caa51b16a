"""StreamingLLM's claim (Xiao et al., 2024), measured on SmolLM2-135M-Instruct on this machine.

Scores one long text token by token (teacher forced, one decode step per token) with three
caches: the full cache, a window of the latest `--window` tokens only, and `--sinks` attention
sinks + the latest `--window - --sinks` (the same cache size). Then generates 4x the streaming
cache's size greedily with sinks + window and reports the cache's (constant) size in bytes.

  python tools/streaming_ppl.py --out=tools/results/cpu-2026-11-30/long_context \
      [--tokens=1024 --window=128 --sinks=4]
"""

from __future__ import annotations

import json
import math
import os
import sysconfig

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Directory for the table and JSON.")
_TOKENS = flags.DEFINE_integer("tokens", 1024, "Tokens of text scored.")
_WINDOW = flags.DEFINE_integer("window", 128, "Cache size of the bounded caches, in tokens.")
_SINKS = flags.DEFINE_integer("sinks", 4, "Attention sinks of the streaming cache.")
_TEXT = flags.DEFINE_string("text", os.path.join(sysconfig.get_paths()["stdlib"], "typing.py"),
                            "The text file scored (default: the standard library's typing.py).")
flags.mark_flags_as_required(["out"])


def _nll(model, ids, stream):
  """Mean negative log-likelihood of ids[1:] decoded one token at a time."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jaxllm.inference import generate as gen
  cfg = model.config
  size = len(ids) if stream is None else stream.cache_len(1)
  cache = gen.new_cache(cfg, "contiguous", [len(ids)], max_len=size)
  last, cache = gen.prefill(model.graphdef, model.params, [ids[:1]], cache, prefill_chunk=1,
                            vocab_size=cfg.vocab_size, stream=stream)
  total = 0.0
  for t in range(1, len(ids)):
    total -= float(jax.nn.log_softmax(last[0])[ids[t]])
    last, cache = gen.decode_step(model.graphdef, model.params, jnp.asarray(ids[t:t + 1]),
                                  cache, stream=stream)
  return total / (len(ids) - 1), int(np.prod(cache.k.shape)) * 2 * cache.k.dtype.itemsize


def main(argv):
  del argv
  import jaxllm
  from jaxllm.fetch import fetch
  from jaxllm.inference import generate as gen
  from jaxllm.inference import sampling
  from jaxllm.model.cache import Stream
  model = jaxllm.load(fetch("smollm2-135m"))
  with open(_TEXT.value) as f:
    ids = model.prompt_ids(f.read())[:_TOKENS.value]
  W, s = _WINDOW.value, _SINKS.value
  runs = {"full cache": None, f"window {W}": Stream(0, W),
          f"{s} sinks + window {W - s}": Stream(s, W - s)}
  results = {}
  for name, stream in runs.items():
    nll, cache_bytes = _nll(model, ids, stream)
    results[name] = {"ppl": math.exp(nll), "cache_bytes": cache_bytes}
    print(name, results[name], flush=True)
  stream = Stream(s, W - s)
  n = 4 * stream.cache_len(1)
  (out,) = gen.generate_requests(model.graphdef, model.params, [ids[:64]],
                                 [sampling.SamplingParams(max_tokens=n)], stream=stream,
                                 max_seq_len=model.config.max_seq_len, prefill_chunk=1)
  generation = {"tokens": len(out.tokens), "cache_slots": stream.cache_len(1),
                "text_tail": model.tokenizer.decode(out.tokens[-40:])}
  lines = [f"SmolLM2-135M-Instruct, {len(ids)} tokens of {os.path.basename(_TEXT.value)}, "
           "teacher-forced one token per step", "",
           "| cache | perplexity | cache bytes |", "|---|---|---|"]
  lines += [f"| {k} | {v['ppl']:.2f} | {v['cache_bytes']} |" for k, v in results.items()]
  lines += ["", f"generated {generation['tokens']} tokens through a {generation['cache_slots']}"
            "-slot streaming cache"]
  print("\n".join(lines))
  with open(os.path.join(_OUT.value, "streaming.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(_OUT.value, "streaming.json"), "w") as f:
    json.dump({"results": results, "generation": generation, "tokens": len(ids),
               "window": W, "sinks": s}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
