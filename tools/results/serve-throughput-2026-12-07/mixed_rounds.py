"""The serve bench's workload (SmolLM2-135M, 32 requests at 8/s, outputs clipped at 256) on
the engine's default steps and with `mixed_steps` (prompt tokens riding in the decode steps),
alternating, `ROUNDS` pairs: tokens/s, TTFT p50, and whether the outputs are identical.

  python tools/results/serve-throughput-2026-12-07/mixed_rounds.py [ROUNDS]
"""
import dataclasses
import sys

import numpy as np

import jaxllm
from jaxllm.bench import serve
from jaxllm.fetch import fetch
from jaxllm.inference import engine as engine_lib
from jaxllm.inference import paging

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
model = jaxllm.load(fetch("smollm2-135m"))
tok = model.tokenizer
bos = tok.bos_id if tok.add_bos and tok.bos_id >= 0 else None
prompts, outs = serve._workload(tok, 32, 0, bos, out_range=(4, 256))
arrivals = np.cumsum(np.random.default_rng(1).exponential(1.0 / 8.0, 32))
cfg = engine_lib.EngineConfig(max_slots=8, page_size=16, prefill_chunk=64, max_seq_len=1024,
                              num_pages=8 * paging.pages_for(1024, 16))
ratios = []
for i in range(rounds):
  runs = {}
  for mixed in ((False, True) if i % 2 == 0 else (True, False)):
    r = serve._continuous(model, dataclasses.replace(cfg, mixed_steps=mixed), prompts, outs,
                          arrivals)
    runs[mixed] = r
  rate = {m: r["tokens"] / r["seconds"] for m, r in runs.items()}
  same = all(a.tokens == b.tokens for a, b in zip(runs[True]["requests"],
                                                   runs[False]["requests"]))
  ratios.append(rate[True] / rate[False])
  print(f"round {i}: separate {rate[False]:.1f} tokens/s (TTFT p50 "
        f"{np.percentile(runs[False]['ttft'], 50):.2f} s), mixed {rate[True]:.1f} (TTFT p50 "
        f"{np.percentile(runs[True]['ttft'], 50):.2f} s), ratio {ratios[-1]:.2f}, outputs "
        f"identical: {same}", flush=True)
print(f"mixed / separate median {np.median(ratios):.2f} over {rounds} rounds")
