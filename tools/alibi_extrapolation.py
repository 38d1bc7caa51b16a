"""ALiBi's extrapolation claim (Press et al., 2022), measured on this machine.

Trains two identical tiny models on the standard library's sources, one with RoPE and one with
ALiBi, at the same sequence length and steps (`python -m jaxllm.train`), then scores the same
held-out text with windows of 1x, 2x and 4x the training length (`jaxllm.eval.evaluate`, windows
advancing by half their length). Prints a markdown table and writes the JSON beside it.

  python tools/alibi_extrapolation.py --out=tools/results/cpu-2026-11-30/long_context \
      [--steps=500 --seq_len=64 --eval_tokens=40000]
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from absl import app, flags

_OUT = flags.DEFINE_string("out", None, "Directory for the table and JSON.")
_WORK = flags.DEFINE_string("work", "/tmp/alibi_extrapolation", "Directory for the two workdirs.")
_STEPS = flags.DEFINE_integer("steps", 500, "Training steps of each model.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "Training sequence length.")
_EVAL_TOKENS = flags.DEFINE_integer("eval_tokens", 40_000, "Held-out tokens scored per length.")
flags.mark_flags_as_required(["out"])

MODEL = dict(vocab_size=1024, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32,
             d_ff=384, max_seq_len=1024, dtype="bfloat16", attention_impl="xla")


def _train(workdir: str, encoding: str) -> None:
  if os.path.exists(os.path.join(workdir, "config.json")) and os.path.isdir(
      os.path.join(workdir, "checkpoints", str(_STEPS.value))):
    return  # already trained (the script resumes after a crash)
  overrides = {**{f"model.{k}": v for k, v in MODEL.items()},
               "model.position_encoding": encoding, "train.steps": _STEPS.value,
               "train.seq_len": _SEQ_LEN.value, "train.batch_size": 16,
               "train.eval_every": _STEPS.value, "train.checkpoint_every": _STEPS.value,
               "train.warmup_steps": 30, "data.tokenizer_max_sentences": 50_000}
  cmd = [sys.executable, "-m", "jaxllm.train", f"--workdir={workdir}",
         *[f"--config.{k}={v}" for k, v in overrides.items()]]
  subprocess.run(cmd, check=True)


def _held_out_texts(model, budget: int) -> list[str]:
  """The first held-out documents of the training corpus, up to `budget` tokens."""
  from jaxllm.data import corpus
  texts, used = [], 0
  for ref in sorted(corpus.build_corpus((), 0.05).eval, key=lambda r: r.path):
    text = corpus.read_document(ref)
    n = len(model.prompt_ids(text))
    if n < 4 * _SEQ_LEN.value:
      continue  # too short to need long windows
    texts.append(text)
    used += n
    if used >= budget:
      break
  return texts


def main(argv):
  del argv
  import jaxllm
  from jaxllm.eval import evaluate
  os.makedirs(_OUT.value, exist_ok=True)
  results = {}
  for encoding in ("rope", "alibi"):
    workdir = os.path.join(_WORK.value, encoding)
    _train(workdir, encoding)
    model = jaxllm.load(workdir)
    texts = _held_out_texts(model, _EVAL_TOKENS.value)
    for mult in (1, 2, 4):
      L = mult * _SEQ_LEN.value
      nll, tokens = evaluate(model, texts, max_len=L, stride=L // 2, batch_size=8,
                             progress=False)
      results.setdefault(encoding, {})[f"{mult}x"] = {
          "max_len": L, "ppl": math.exp(nll / tokens), "tokens": int(tokens)}
  lines = [f"train seq_len {_SEQ_LEN.value}, {_STEPS.value} steps, batch 16; held-out "
           f"perplexity (windows advance by half their length)", "",
           "| position encoding | 1x | 2x | 4x |", "|---|---|---|---|"]
  for encoding, row in results.items():
    lines.append(f"| {encoding} | " + " | ".join(
        f"{row[m]['ppl']:.2f} ({row[m]['max_len']})" for m in ("1x", "2x", "4x")) + " |")
  table = "\n".join(lines)
  print(table)
  with open(os.path.join(_OUT.value, "extrapolation.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(_OUT.value, "extrapolation.json"), "w") as f:
    json.dump({"config": {"model": MODEL, "steps": _STEPS.value, "seq_len": _SEQ_LEN.value},
               "results": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
