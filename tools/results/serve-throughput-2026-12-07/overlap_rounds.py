"""Overlapped against lockstep engine runs, alternating, on the serve bench's workload
(SmolLM2-135M, 32 requests at 8/s, outputs clipped at 256), `ROUNDS` pairs: tokens/s of each
run and the median ratio. What `EngineConfig.overlap`'s CPU default rests on.

  python tools/results/serve-throughput-2026-12-07/overlap_rounds.py [ROUNDS] [WEIGHTS]
"""
import sys

import numpy as np

import jaxllm
from jaxllm.bench import decode as decode_bench
from jaxllm.bench import serve
from jaxllm.fetch import fetch
from jaxllm.inference import engine as engine_lib
from jaxllm.inference import paging

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
weights = sys.argv[2] if len(sys.argv) > 2 else "float32"
model = jaxllm.load(fetch("smollm2-135m"))
if weights != "float32":
  model = model.quantized(int(weights[-1]), head_bits=decode_bench.HEAD_BITS)
tok = model.tokenizer
bos = tok.bos_id if tok.add_bos and tok.bos_id >= 0 else None
prompts, outs = serve._workload(tok, 32, 0, bos, out_range=(4, 256))
arrivals = np.cumsum(np.random.default_rng(1).exponential(1.0 / 8.0, 32))
cfg = engine_lib.EngineConfig(max_slots=8, page_size=16, prefill_chunk=64, max_seq_len=1024,
                              num_pages=8 * paging.pages_for(1024, 16))
ratios = []
for i in range(rounds):
  runs = {}
  for overlap in ((True, False) if i % 2 == 0 else (False, True)):
    r = serve._continuous(model, cfg, prompts, outs, arrivals, overlap=overlap)
    runs[overlap] = r["tokens"] / r["seconds"]
  ratios.append(runs[True] / runs[False])
  print(f"round {i}: overlapped {runs[True]:.1f} tokens/s, lockstep {runs[False]:.1f}, "
        f"ratio {ratios[-1]:.2f}", flush=True)
print(f"{weights}: overlapped / lockstep median {np.median(ratios):.2f} over {rounds} rounds "
      f"({', '.join(f'{x:.2f}' for x in ratios)})")
