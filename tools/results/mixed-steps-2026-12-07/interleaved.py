"""The interleaved rows of `jaxllm.bench serve` alone: interleaved.py CHECKPOINT LONG_PROMPT_TOKENS."""
import json, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', '..'))
import jaxllm
from jaxllm.bench import serve, decode as db
from jaxllm.inference import engine as engine_lib, paging
ck = sys.argv[1]; L = int(sys.argv[2])
m = jaxllm.load(ck)
tok = m.tokenizer
bos = tok.bos_id if tok.add_bos and tok.bos_id >= 0 else None
cfg = engine_lib.EngineConfig(max_slots=8, page_size=16, prefill_chunk=64, max_seq_len=1024, num_pages=8*paging.pages_for(1024,16))
pool = db.stdlib_prompts(tok, 8, L, bos)
streams = [p[:32] for p in pool[:7]]
for mixed in (False, True):
  t=time.time()
  r = serve._interleaved(m, cfg, streams, 256, pool[-1][:L], 8, mixed=mixed)
  r.pop('tokens')
  print(mixed, round(time.time()-t,1), json.dumps(r))
