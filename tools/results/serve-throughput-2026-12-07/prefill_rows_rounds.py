"""The serve bench's workload (SmolLM2-135M, 32 requests at 8/s, outputs clipped at 256) with
`prefill_rows` = 1 (the default: one request's prompt chunk per step) and `ROWS` (that many
waiting requests' chunks in one prefill call), alternating, `ROUNDS` pairs: tokens/s, TTFT
p50, and whether the outputs are identical.

  python tools/results/serve-throughput-2026-12-07/prefill_rows_rounds.py [ROUNDS] [ROWS]
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
rows = int(sys.argv[2]) if len(sys.argv) > 2 else 4
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
  for n in ((1, rows) if i % 2 == 0 else (rows, 1)):
    runs[n] = serve._continuous(model, dataclasses.replace(cfg, prefill_rows=n), prompts, outs,
                                arrivals)
  rate = {n: r["tokens"] / r["seconds"] for n, r in runs.items()}
  same = all(a.tokens == b.tokens for a, b in zip(runs[1]["requests"], runs[rows]["requests"]))
  ratios.append(rate[rows] / rate[1])
  print(f"round {i}: prefill_rows=1 {rate[1]:.1f} tokens/s (TTFT p50 "
        f"{np.percentile(runs[1]['ttft'], 50):.2f} s, {runs[1]['decode_steps']} steps), "
        f"prefill_rows={rows} {rate[rows]:.1f} (TTFT p50 "
        f"{np.percentile(runs[rows]['ttft'], 50):.2f} s, {runs[rows]['decode_steps']} steps), "
        f"ratio {ratios[-1]:.2f}, outputs identical: {same}", flush=True)
print(f"prefill_rows={rows} / 1 median {np.median(ratios):.2f} over {rounds} rounds")
