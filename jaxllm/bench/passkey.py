"""Passkey retrieval (Mohtashami & Jaggi, 2023): a 5-digit key hidden at a random depth in
filler text; the model must repeat it. Greedy, through the KV cache with chunked prefill, so an
8k-token prompt fits in memory; optionally with RoPE scaling (to go past the context).

`python -m jaxllm.bench passkey --lengths=1024,4096 --trials=4 [--scalings=none,yarn:2]`
"""

from __future__ import annotations

import dataclasses
import random
import re

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
          "again. ")
QUESTION = "What is the pass key? The pass key is"


def prompt_ids(tokenizer_encode, length: int, key: int, depth: float) -> list[int]:
  """Token ids of a ~`length`-token prompt with "The pass key is KEY." at `depth` (0-1) of the
  filler."""
  head = ("There is an important piece of information hidden inside a lot of irrelevant text. "
          "Find it and memorize it. I will quiz you about it.\n")
  needle = f"The pass key is {key}. Remember it. {key} is the pass key.\n"
  fixed = len(tokenizer_encode(head + needle + QUESTION))
  unit = len(tokenizer_encode(FILLER))
  repeats = max(1, (length - fixed) // unit)
  before = int(round(repeats * depth))
  text = head + FILLER * before + needle + FILLER * (repeats - before) + QUESTION
  return tokenizer_encode(text)


def scaled(model, scaling: str):
  """(graphdef, config) of `model` with RoPE scaling `none` or `KIND:FACTOR` (yarn:2, ntk:2,
  dynamic:2, linear:2), the original context being the model's max_seq_len."""
  from jaxllm.model import transformer
  cfg = model.config
  if scaling != "none":
    kind, _, factor = scaling.partition(":")
    cfg = dataclasses.replace(cfg, rope_scaling=kind, rope_scaling_factor=float(factor or 2),
                              rope_original_max_len=cfg.max_seq_len)
    from jaxllm import config as config_lib
    config_lib.validate_model(cfg)
  return transformer.abstract_params(cfg)[0], cfg


def run(path: str, *, lengths: tuple[int, ...], trials: int, scalings: tuple[str, ...],
        prefill_chunk: int = 512, seed: int = 0) -> dict:
  import jaxllm
  from jaxllm.inference import generate as gen
  from jaxllm.inference import sampling
  model = jaxllm.load(path)
  rng = random.Random(seed)
  cases = [(L, rng.randint(10_000, 99_999), rng.random()) for L in lengths
           for _ in range(trials)]
  rows = []
  for scaling in scalings:
    graphdef, cfg = scaled(model, scaling)
    for L, key, depth in cases:
      ids = prompt_ids(model.tokenizer.encode, L, key, depth)
      (out,) = gen.generate_requests(graphdef, model.params, [ids],
                                     [sampling.SamplingParams(max_tokens=8)],
                                     prefill_chunk=prefill_chunk)
      text = model.tokenizer.decode(out.tokens)
      found = re.findall(r"\d+", text)
      rows.append({"scaling": scaling, "length": L, "prompt_tokens": len(ids), "key": key,
                   "depth": round(depth, 3), "answer": text,
                   "correct": bool(found) and int(found[0]) == key})
  return {"model": path, "context": model.config.max_seq_len, "trials": trials, "rows": rows}


def table(result: dict) -> str:
  lines = [f"passkey retrieval, {result['trials']} trials per cell (model context "
           f"{result['context']} tokens); correct / trials", "",
           "| scaling | " + " | ".join(str(L) for L in _lengths(result)) + " |",
           "|---|" + "---|" * len(_lengths(result))]
  for scaling in dict.fromkeys(r["scaling"] for r in result["rows"]):
    cells = []
    for L in _lengths(result):
      rows = [r for r in result["rows"] if r["scaling"] == scaling and r["length"] == L]
      cells.append(f"{sum(r['correct'] for r in rows)}/{len(rows)}")
    lines.append(f"| {scaling} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _lengths(result):
  return list(dict.fromkeys(r["length"] for r in result["rows"]))
