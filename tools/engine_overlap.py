"""What host/device overlap gains the engine when the device step is short.

`python -m jaxllm.bench serve` measures overlap on SmolLM2-135M, where on a 2-core CPU one
decode step of 8 slots takes ~65 ms and the host's share of it is a few percent. This script
runs the same engine on random-weight models small enough that the host's bookkeeping is a
large share of each step (as it is for real models on an accelerator), alternating
`overlap=False` / `True` `--rounds` times, and prints tokens/s and the median ratio.

  python tools/engine_overlap.py [--rounds=3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.inference import engine as engine_lib
from jaxllm.inference import sampling
from jaxllm.model import transformer


def tokens_per_s(model, prompts, overlap: bool) -> float:
  engine = engine_lib.Engine(*model, engine_lib.EngineConfig(
      max_slots=8, num_pages=256, page_size=16, overlap=overlap))
  params = [sampling.SamplingParams(max_tokens=200)] * len(prompts)
  engine_lib.generate_all(engine, prompts[:8], params[:8])  # compile outside the clock
  start = time.perf_counter()
  requests = engine_lib.generate_all(engine, prompts, params)
  return sum(len(r.tokens) for r in requests) / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  for d_model, layers in ((256, 4), (512, 8)):
    cfg = ModelConfig(vocab_size=4096, d_model=d_model, n_layers=layers, n_heads=8,
                      n_kv_heads=4, head_dim=d_model // 8, d_ff=4 * d_model, max_seq_len=512)
    model = transformer.split(transformer.create(cfg, 0))
    prompts = [rng.integers(0, cfg.vocab_size, 32).tolist() for _ in range(32)]
    ratios = []
    for _ in range(args.rounds):
      lock, over = tokens_per_s(model, prompts, False), tokens_per_s(model, prompts, True)
      ratios.append(over / lock)
      print(f"d_model={d_model} layers={layers}: lockstep {lock:.0f} tok/s, overlap "
            f"{over:.0f} tok/s ({over / lock:.2f}x)", flush=True)
    print(f"d_model={d_model} layers={layers}: median overlap / lockstep "
          f"{np.median(ratios):.2f}x over {args.rounds} rounds")


if __name__ == "__main__":
  main()
