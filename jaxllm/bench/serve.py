"""`jaxllm.bench serve`: continuous against static batching on one workload, in one run.

Workload (fixed seed): `requests` prompts cut from stdlib files with lengths drawn uniformly
from [16, 128] tokens and output lengths from an exponential distribution (mean 128) clipped
to [4, 512] (stop at exactly that many: no eos; outputs about twice the prompts, as in
ShareGPT-style chat traffic; `max_output_tokens=N` clips at N instead, with mean N / 4),
arriving as a Poisson process at `rate` requests/s. Both modes see the same arrival times,
on the same engine-sized batch of `max_slots`:
  continuous  the engine: a request is admitted as soon as a slot and its pages are free, and
              streams its tokens (time to first token = its first token's time - arrival);
              its default mode for the platform, one of:
  overlapped  `overlap=True`: the host dispatches each decode step before it reads the last
              one's tokens, and does its bookkeeping while the step runs;
  lockstep    `overlap=False`: the host reads each decode step's tokens before dispatching the
              next;
  static      batches of `max_slots` requests in arrival order, each batch started when it is
              full (or the last one) and the previous batch is done, run to its longest
              request with `generate_requests`; tokens arrive when the batch returns.
Throughput = output tokens / (last completion - first arrival). Each engine row also breaks
its wall time per decode step down into the host's parts (`engine.STEP_PARTS`, from the
engine's own clock; `wait` is the device time the host did not hide, `other` idle time
between arrivals). The raw decode row runs `max_slots` stdlib prompts of 64 tokens as one
batch through the offline device loop (contiguous cache, 64 new tokens each): its decode rate
as `jaxllm.bench decode` reports it (prefill left out), and its output rate with the prefill,
the engine rows' ceilings at full occupancy. With `weights`, these rows run again with int8
and int4 block weights. KV utilisation of the paged
cache = tokens stored / capacity of the pages running requests hold, averaged over decode
steps. The prefix-cache rows run a second workload whose prompts share a long system prompt,
with prefix caching on and off. The multi-LoRA row (`lora_adapters` > 0) serves the continuous
workload with that many rank-`lora_rank` adapters on every projection, each request taking the
base or one of them in turn, batched together (`jaxllm.lora.bank`): its cost against the base
alone. The adapters' `b` is zero (PEFT's initialisation), so every output must equal the
continuous row's, while the products are all computed. The structured row (`structured`)
serves the continuous workload with every request held to a JSON schema no request can
finish (an array of at least 1000 {"name": string, "value": number} objects, `JSON_SCHEMA`),
so each runs to its max_tokens as in the continuous row and the throughputs compare: the
grammar's masks are computed on the host before each step and applied in it, and those steps
run in lockstep; it reports the host time spent on masks per token. `structured_rounds` > 1
measures it against fresh continuous runs, pair by pair, and reports the median ratio. With
`speculative_k`, the constrained traffic runs again on a speculative engine, whose constrained
requests propose what their grammar forces and prompt lookup's continuation, checked against
the grammar (`structured_speculative`: its speed against the structured row, and whether its
outputs are the structured row's token for token).
The interleaved rows (`interleaved`) keep max_slots - 1 greedy streams decoding
max_output_tokens / 2 tokens while prompts of `long_prompt_tokens` arrive one after another
(the next as soon as the last has its first token), with prompt chunks in prefill steps of
their own and then riding in the decode steps (`EngineConfig.mixed_steps`): the streams'
inter-token latency (gaps between their tokens reaching the host, p50 / p99 / max) and the
long prompts' time to first token.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxllm.bench import decode as decode_bench

# The structured row's schema: longer than any max_tokens, so every request ends at its own
# (as in the other rows) and produces as many tokens.
JSON_SCHEMA = {"type": "array", "minItems": 1000, "items": {
    "type": "object", "properties": {"name": {"type": "string"}, "value": {"type": "number"}},
    "required": ["name", "value"], "additionalProperties": False}}


def _workload(tokenizer, n, seed, bos, *, system=None, prompt_range=(16, 128),
              out_range=(4, 512)):
  rng = np.random.default_rng(seed)
  pool = decode_bench.stdlib_prompts(tokenizer, n, prompt_range[1], bos)
  assert len(pool) == n
  prompts, outs = [], []
  for i in range(n):
    length = int(rng.integers(prompt_range[0], prompt_range[1] + 1))
    prompts.append((list(system) if system else []) + pool[i][:length])
    # Long tail: most requests short, a few long (what static batching handles worst).
    outs.append(int(np.clip(rng.exponential(out_range[1] / 4), out_range[0], out_range[1])))
  return prompts, outs


def _continuous(model, engine_cfg, prompts, outs, arrivals, *, prefix_caching=True,
                speculative_k=0, overlap=None, draft=None, params=None, constraint=None):
  """`params`: other params for the model (a LoRA bank: request i takes slot i mod size).
  `constraint`: a function giving each request a fresh `grammar.Constraint`. `overlap` None:
  the engine's default for the platform."""
  import dataclasses
  from jaxllm.inference import engine as engine_lib
  from jaxllm.inference import sampling
  engine = engine_lib.Engine(model.graphdef, model.params if params is None else params,
                             dataclasses.replace(engine_cfg, prefix_caching=prefix_caching,
                                                 speculative_k=speculative_k,
                                                 overlap=overlap), draft=draft)
  # Compile the programs (one per page-table width) before the clock starts.
  width = 1
  while width <= engine.max_pages:
    n = max(1, min(width * engine_cfg.page_size, engine.max_seq_len - 2) - 1)
    warm = engine.submit([prompts[0][0]] * n, sampling.SamplingParams(max_tokens=2),
                         constraint=None if constraint is None else constraint())
    engine.run_until_idle()
    assert warm.done
    width *= 2
  engine.prefix_cache.evict(engine.allocator.num_pages)
  engine.stats.clear()
  engine.step_times.clear()
  start = time.monotonic()
  requests, util = [], []
  while len(requests) < len(prompts) or not engine.idle:
    now = time.monotonic() - start
    while len(requests) < len(prompts) and arrivals[len(requests)] <= now:
      i = len(requests)
      r = engine.submit(prompts[i], sampling.SamplingParams(max_tokens=outs[i]),
                        adapter=i % engine.adapter_slots,
                        constraint=None if constraint is None else constraint())
      r.arrival = start + arrivals[i]
      requests.append(r)
    if engine.idle:
      time.sleep(min(0.005, max(arrivals[len(requests)] - now, 0)))
      continue
    engine.step()
    if engine.metrics()["active_slots"]:
      util.append(engine.kv_utilisation())
  end = time.monotonic()
  ttft = [r.first_token_at - r.arrival for r in requests]
  steps = max(engine.stats["decode_steps"], 1)
  parts = {part: 1e3 * engine.step_times[part] / steps for part in engine_lib.STEP_PARTS}
  parts["other"] = 1e3 * (end - start) / steps - sum(parts.values())
  return dict(seconds=end - start, decode_steps=engine.stats["decode_steps"],
              step_ms=1e3 * (end - start) / steps, step_parts_ms=parts,
              tokens=sum(len(r.tokens) for r in requests),
              ttft=ttft, kv_utilisation=float(np.mean(util)) if util else None,
              preemptions=engine.stats["preemptions"],
              prefix_hit_tokens=engine.stats["prefix_hit_tokens"], requests=requests,
              proposed=engine.stats["speculative_proposed"],
              accepted=engine.stats["speculative_accepted"],
              grammar_proposed=engine.stats["grammar_proposed"],
              grammar_accepted=engine.stats["grammar_accepted"],
              mask_seconds=engine.stats["grammar_mask_s"])


def _interleaved(model, engine_cfg, stream_prompts, stream_out, long_prompt, long_out, *,
                 mixed: bool):
  """Streams decoding while long prompts arrive one after another (the next when the last has
  its first token): the streams' inter-token latencies, and the long prompts' times to first
  token, with prompt chunks in steps of their own or riding in the decode steps (`mixed`)."""
  import dataclasses
  from jaxllm.inference import engine as engine_lib
  from jaxllm.inference import sampling
  engine = engine_lib.Engine(model.graphdef, model.params, dataclasses.replace(
      engine_cfg, mixed_steps=mixed, prefix_caching=False))
  # Compile every page-table width the run reaches, of both step kinds, before the clock
  # starts: a short request decodes while a prompt of that width prefills.
  from jaxllm.inference import generate as gen
  from jaxllm.inference import paging
  longest = max(len(stream_prompts[0]) + stream_out, len(long_prompt) + long_out)
  widest = min(gen.bucket(paging.pages_for(longest, engine_cfg.page_size), minimum=1),
               engine.max_pages)
  width = 1
  while width <= widest:
    n = max(1, min(width * engine_cfg.page_size, engine.max_seq_len - 4) - 1)
    warm = [engine.submit(stream_prompts[0][:1], sampling.SamplingParams(max_tokens=4)),
            engine.submit([long_prompt[0]] * n, sampling.SamplingParams(max_tokens=2))]
    engine.run_until_idle()
    assert all(r.done for r in warm)
    width *= 2
  engine.stats.clear()
  times: dict[int, list[float]] = {}
  stamp = lambda r, t: times.setdefault(id(r), []).append(time.monotonic())
  start = time.monotonic()
  streams = [engine.submit(p, sampling.SamplingParams(max_tokens=stream_out), on_token=stamp)
             for p in stream_prompts]
  longs = []
  while not all(r.done for r in streams):
    if not longs or longs[-1].first_token_at is not None:
      longs.append(engine.submit(long_prompt, sampling.SamplingParams(max_tokens=long_out)))
    engine.step()
  seconds = time.monotonic() - start
  engine.run_until_idle()
  gaps = np.concatenate([np.diff(times[id(r)]) for r in streams])
  ttft = [r.first_token_at - r.arrival for r in longs if r.first_token_at is not None]
  return dict(seconds=seconds, itl_p50_ms=1e3 * float(np.percentile(gaps, 50)),
              itl_p99_ms=1e3 * float(np.percentile(gaps, 99)), itl_max_ms=1e3 * float(gaps.max()),
              stream_tokens_per_s=sum(len(r.tokens) for r in streams) / seconds,
              long_prompts=len(ttft), long_ttft_p50=float(np.percentile(ttft, 50)),
              prompt_tokens_per_s=engine.stats["prefill_tokens"] / seconds,
              mixed_steps=engine.stats["mixed_steps"], tokens=[r.tokens for r in streams])


def _static(model, slots, prompts, outs, arrivals):
  from jaxllm.inference import generate as gen
  from jaxllm.inference import sampling
  sp = lambda i: sampling.SamplingParams(max_tokens=outs[i])
  # Compile the shapes the batches will use, outside the clock.
  batches = [list(range(i, min(i + slots, len(prompts)))) for i in range(0, len(prompts), slots)]
  for b in batches:
    gen.generate_requests(model.graphdef, model.params, [prompts[i] for i in b],
                          [sp(i) for i in b])
  start = time.monotonic()
  ttft, tokens = [], 0
  for b in batches:
    wait = arrivals[b[-1]] - (time.monotonic() - start)
    if wait > 0:
      time.sleep(wait)
    out = gen.generate_requests(model.graphdef, model.params, [prompts[i] for i in b],
                                [sp(i) for i in b])
    done = time.monotonic() - start
    ttft += [done - arrivals[i] for i in b]
    tokens += sum(len(o.tokens) for o in out)
  return dict(seconds=time.monotonic() - start, tokens=tokens, ttft=ttft)


def _raw_decode(model, prompts, new_tokens: int = 64, repeats: int = 2) -> dict:
  """The prompts as one batch through the offline device loop (contiguous cache, greedy,
  exactly `new_tokens` each): decode tokens/s as `jaxllm.bench decode` reports it, prefill left
  out (the time of the same call with one new token subtracted), and output tokens/s of the
  whole call, prefill included."""
  calls = {n: decode_bench.jaxllm_call(model.graphdef, model.params, prompts, n)
           for n in (new_tokens, 1)}
  best, _ = decode_bench.interleaved(calls, repeats)
  B = len(prompts)
  return dict(batch=B, new_tokens=new_tokens, prompt_tokens=len(prompts[0]),
              tokens_per_s=B * (new_tokens - 1) / max(best[new_tokens] - best[1], 1e-9),
              with_prefill_tokens_per_s=B * new_tokens / best[new_tokens])


def _summary(r: dict) -> dict:
  out = dict(seconds=r["seconds"], output_tokens=r["tokens"],
             tokens_per_s=r["tokens"] / r["seconds"],
             ttft_p50=float(np.percentile(r["ttft"], 50)),
             ttft_p99=float(np.percentile(r["ttft"], 99)))
  if "step_ms" in r:
    out.update(decode_steps=r["decode_steps"], step_ms=r["step_ms"],
               step_parts_ms=r["step_parts_ms"])
  return out


def _core_rows(model, cfg, prompts, outs, arrivals, raw_prompts):
  """The continuous, overlapped, lockstep, static and raw decode rows of one model's weights:
  (rows, the continuous run, the lockstep run). Continuous is the engine's default, which is
  one of the other two (`EngineConfig.overlap`): that row's run, not another."""
  from jaxllm.inference import engine as engine_lib
  # The engine with the host overlapped (each decode step dispatched before the last one's
  # tokens are read) and in lockstep (read first).
  over = _continuous(model, cfg, prompts, outs, arrivals, overlap=True)
  lock = _continuous(model, cfg, prompts, outs, arrivals, overlap=False)
  default = engine_lib.default_overlap(model.params)
  cont = over if default else lock
  stat = _static(model, cfg.max_slots, prompts, outs, arrivals)
  rows = {"continuous": _summary(cont), "overlapped": _summary(over),
          "lockstep": _summary(lock), "static": _summary(stat)}
  rows["continuous"].update(kv_utilisation=cont["kv_utilisation"],
                            preemptions=cont["preemptions"],
                            mode="overlapped" if default else "lockstep")
  rows["overlapped"].update(
      vs_lockstep=lock["seconds"] / over["seconds"],
      identical=all(a.tokens == b.tokens for a, b in zip(over["requests"], lock["requests"])))
  rows["raw"] = raw = _raw_decode(model, raw_prompts)
  for mode in ("continuous", "overlapped", "lockstep"):
    rows[mode].update(vs_raw=rows[mode]["tokens_per_s"] / raw["tokens_per_s"],
                      vs_raw_with_prefill=rows[mode]["tokens_per_s"]
                      / raw["with_prefill_tokens_per_s"],
                      vs_static=rows[mode]["tokens_per_s"] / rows["static"]["tokens_per_s"])
  return rows, cont, lock


# The weights `run(weights=)` takes: the checkpoint's as loaded (float32), or its block weights
# rounded in memory as `jaxllm.bench decode`'s int8 and int4 peers (embedding and tied head
# int8 per row).
WEIGHTS = ("float32", "int8", "int4")


def run(path: str, *, requests: int = 64, rate: float = 8.0, max_slots: int = 8,
        page_size: int = 16, prefill_chunk: int = 64, seed: int = 0,
        prefix_requests: int = 32, system_tokens: int = 256, speculative_k: int = 4,
        draft: str = "ngram", max_output_tokens: int = 512, mesh: str | None = None,
        lora_adapters: int = 4, lora_rank: int = 16, structured: bool = True,
        structured_rounds: int = 1, interleaved: bool = True, long_prompt_tokens: int = 512,
        weights: tuple[str, ...] = ("float32",)) -> dict:
  """`mesh` ("tensor=4"): every mode runs on the model split over that mesh. `weights`: the
  continuous, lockstep, static and raw rows again for each (of `WEIGHTS`); the other rows run
  on the first."""
  import jaxllm
  from jaxllm.inference import engine as engine_lib
  from jaxllm.inference import paging
  unknown = set(weights) - set(WEIGHTS)
  if unknown or not weights:
    raise ValueError(f"weights {sorted(unknown) or '(none)'}: one or more of {WEIGHTS}")
  loaded = jaxllm.load(path, mesh=mesh)
  tok = loaded.tokenizer
  bos = tok.bos_id if tok.add_bos and tok.bos_id >= 0 else None
  prompts, outs = _workload(tok, requests, seed, bos, out_range=(4, max_output_tokens))
  rng = np.random.default_rng(seed + 1)
  arrivals = np.cumsum(rng.exponential(1.0 / rate, requests))
  max_len = 1024
  cfg = engine_lib.EngineConfig(max_slots=max_slots, page_size=page_size,
                                prefill_chunk=prefill_chunk, max_seq_len=max_len,
                                num_pages=max_slots * paging.pages_for(max_len, page_size))
  raw_prompts = decode_bench.stdlib_prompts(tok, max_slots, 64, bos)
  models = {kind: loaded if kind == "float32" else loaded.quantized(
      int(kind[-1]), head_bits=decode_bench.HEAD_BITS) for kind in weights}
  by_weights = {kind: _core_rows(m, cfg, prompts, outs, arrivals, raw_prompts)
                for kind, m in models.items()}
  model = models[weights[0]]  # the other rows' weights
  rows, cont, lock = by_weights[weights[0]]
  if speculative_k:  # the same traffic with `draft`'s proposals verified in each step
    spec = _continuous(model, cfg, prompts, outs, arrivals, speculative_k=speculative_k,
                       draft=model.draft(draft))
    rows["speculative"] = _summary(spec)
    rows["speculative"].update(
        k=speculative_k, draft=draft, acceptance=spec["accepted"] / max(spec["proposed"], 1),
        vs_continuous=cont["seconds"] / spec["seconds"],
        identical=all(a.tokens == b.tokens for a, b in zip(cont["requests"],
                                                           spec["requests"])))
  if lora_adapters:
    from jaxllm.lora import adapters, bank
    from jaxllm.parallel import placement
    from jaxllm.model import transformer
    cfg_lora = adapters.LoraConfig(rank=lora_rank, alpha=float(lora_rank))
    banked = bank.build(model.params, [adapters.add(model.params, cfg_lora, seed=i)
                                       for i in range(lora_adapters)])
    if mesh is not None:
      banked = jax.device_put(banked, placement.qtensor_shardings(
          banked, transformer.logical_axes(model.config), model.mesh))
    multi = _continuous(model, cfg, prompts, outs, arrivals, params=banked)
    rows["multi_lora"] = _summary(multi)
    rows["multi_lora"].update(
        adapters=lora_adapters, rank=lora_rank,
        vs_continuous=cont["seconds"] / multi["seconds"],
        identical=all(a.tokens == b.tokens for a, b in zip(cont["requests"],
                                                           multi["requests"])))
  if structured:
    from jaxllm.inference import grammar
    vocabulary = grammar.Vocabulary(tok, model.config.vocab_size)
    compiled = vocabulary.compile(grammar.GrammarSpec("json_schema", JSON_SCHEMA))
    # More rounds: fresh (unconstrained, constrained) pairs back to back, so a machine whose
    # speed drifts between rows compares like with like; the median ratio is reported.
    ratios = []
    for i in range(structured_rounds):
      base = cont if structured_rounds == 1 else _continuous(model, cfg, prompts, outs, arrivals)
      js = _continuous(model, cfg, prompts, outs, arrivals,
                       constraint=lambda: vocabulary.constraint(compiled))
      ratios.append(base["seconds"] / js["seconds"])
    rows["structured"] = _summary(js)
    rows["structured"].update(
        vs_continuous=float(np.median(ratios)), vs_continuous_rounds=ratios,
        vs_lockstep=lock["seconds"] / js["seconds"],
        mask_ms_per_token=1e3 * js["mask_seconds"] / max(js["tokens"], 1),
        same_lengths=[len(r.tokens) for r in js["requests"]]
        == [len(r.tokens) for r in cont["requests"]])
    if speculative_k:  # the constrained traffic again, grammar-checked proposals verified
      sjs = _continuous(model, cfg, prompts, outs, arrivals, speculative_k=speculative_k,
                        draft=model.draft(draft),
                        constraint=lambda: vocabulary.constraint(compiled))
      rows["structured_speculative"] = _summary(sjs)
      rows["structured_speculative"].update(
          k=speculative_k, draft=draft, vs_structured=js["seconds"] / sjs["seconds"],
          grammar_acceptance=sjs["grammar_accepted"] / max(sjs["grammar_proposed"], 1),
          mask_ms_per_token=1e3 * sjs["mask_seconds"] / max(sjs["tokens"], 1),
          identical=all(a.tokens == b.tokens for a, b in zip(js["requests"],
                                                             sjs["requests"])))
  mixed = None
  if interleaved:
    # max_slots - 1 streams of max_output_tokens / 2 tokens after 32-token prompts, while
    # prompts of long_prompt_tokens arrive one after another into the last slot.
    pool = decode_bench.stdlib_prompts(tok, max_slots, long_prompt_tokens, bos)
    streams = [p[:32] for p in pool[:max_slots - 1]]
    stream_tokens = max(max_output_tokens // 2, 8)
    runs = {m: _interleaved(model, cfg, streams, stream_tokens,
                            pool[-1][:long_prompt_tokens], 8, mixed=m) for m in (False, True)}
    same = runs[False].pop("tokens") == runs[True].pop("tokens")
    mixed = dict(streams=max_slots - 1, stream_tokens=stream_tokens,
                 long_prompt_tokens=long_prompt_tokens,
                 separate=runs[False], mixed=runs[True], identical=same,
                 itl_p99_ratio=runs[False]["itl_p99_ms"] / runs[True]["itl_p99_ms"],
                 itl_p50_ratio=runs[False]["itl_p50_ms"] / runs[True]["itl_p50_ms"])
  # Shared system prompt: the same requests with prefix caching on and off, all at once.
  system = decode_bench.stdlib_prompts(tok, prefix_requests + 1, system_tokens, bos)[-1]
  p_prompts, _ = _workload(tok, prefix_requests, seed + 2, None, system=system,
                           prompt_range=(8, 32))
  p_outs = [16] * prefix_requests
  p_arrivals = np.zeros(prefix_requests)
  on = _continuous(model, cfg, p_prompts, p_outs, p_arrivals, prefix_caching=True)
  off = _continuous(model, cfg, p_prompts, p_outs, p_arrivals, prefix_caching=False)
  same = all(a.tokens == b.tokens for a, b in zip(on["requests"], off["requests"]))
  prefix = dict(requests=prefix_requests, system_tokens=system_tokens,
                on=_summary(on), off=_summary(off),
                speedup=off["seconds"] / on["seconds"],
                ttft_p50_ratio=float(np.percentile(off["ttft"], 50)
                                     / np.percentile(on["ttft"], 50)),
                prefix_hit_tokens=on["prefix_hit_tokens"], identical=same)
  return dict(suite="serve", checkpoint=path, backend=jax.default_backend(),
              requests=requests, rate=rate, max_output_tokens=max_output_tokens,
              max_slots=max_slots, page_size=page_size, mesh=mesh or "one device",
              weights=list(weights), rows=rows,
              by_weights={kind: r for kind, (r, _, _) in by_weights.items()},
              continuous_vs_static=rows["continuous"]["tokens_per_s"]
              / rows["static"]["tokens_per_s"], prefix=prefix, interleaved=mixed)


def _core_table(rows: dict, weights: str) -> list[str]:
  """The continuous, overlapped, lockstep, static and raw rows of one kind of weights, and the
  breakdown of their engine steps."""
  lines = [f"{'mode':<12}{'tokens/s':>10}{'TTFT p50 s':>12}{'TTFT p99 s':>12}{'seconds':>9}"
           f"   ({weights} weights)"]
  for mode in ("continuous", "overlapped", "lockstep", "static"):
    r = rows[mode]
    note = ""
    if mode == "continuous":
      note = f"   (the engine's default here: {r['mode']})"
    if mode in ("continuous", "overlapped"):
      note += (f"   {r['vs_static']:.2f}x static, {r['vs_raw']:.2f}x raw decode, "
               f"{r['vs_raw_with_prefill']:.2f}x with its prefill")
    if mode == "overlapped":
      note += f"; {r['vs_lockstep']:.2f}x lockstep, outputs identical: {r['identical']}"
    lines.append(f"{mode:<12}{r['tokens_per_s']:>10.1f}{r['ttft_p50']:>12.2f}"
                 f"{r['ttft_p99']:>12.2f}{r['seconds']:>9.1f}{note}")
  raw = rows["raw"]
  lines.append(f"{'raw decode':<12}{raw['tokens_per_s']:>10.1f}{'':>33}   batch "
               f"{raw['batch']} in the offline device loop (contiguous cache, "
               f"{raw['prompt_tokens']}-token prompts, {raw['new_tokens']} new tokens, "
               f"prefill left out; {raw['with_prefill_tokens_per_s']:.1f} with it)")
  for mode in ("overlapped", "lockstep"):
    r = rows[mode]
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r["step_parts_ms"].items())
    lines.append(f"  {mode} step: {r['step_ms']:.1f} ms of wall time per decode step "
                 f"({r['decode_steps']} steps) = {parts}")
  return lines


def table(result: dict) -> str:
  rows = result["rows"]
  weights = result.get("weights", ["float32"])
  lines = [f"serve: {result['checkpoint']} on {result['backend']} "
           f"({result.get('mesh', 'one device')}), {result['requests']} "
           f"requests at {result['rate']}/s, {result['max_slots']} slots, pages of "
           f"{result['page_size']}", *_core_table(rows, weights[0])]
  if "speculative" in rows:
    r = rows["speculative"]
    lines.append(f"{'+ ' + r['draft'] + ' k=' + str(r['k']):<12}{r['tokens_per_s']:>10.1f}"
                 f"{r['ttft_p50']:>12.2f}{r['ttft_p99']:>12.2f}{r['seconds']:>9.1f}"
                 f"   {r['vs_continuous']:.2f}x continuous, {r['acceptance']:.1%} of proposals "
                 f"accepted, outputs identical: {r['identical']}")
  if "multi_lora" in rows:
    r = rows["multi_lora"]
    lines.append(f"{'+ ' + str(r['adapters']) + ' LoRAs':<12}{r['tokens_per_s']:>10.1f}"
                 f"{r['ttft_p50']:>12.2f}{r['ttft_p99']:>12.2f}{r['seconds']:>9.1f}"
                 f"   {r['vs_continuous']:.2f}x continuous (rank {r['rank']}, requests of "
                 f"every adapter and the base batched together), outputs identical: "
                 f"{r['identical']}")
  if "structured" in rows:
    r = rows["structured"]
    lines.append(f"{'+ JSON':<12}{r['tokens_per_s']:>10.1f}"
                 f"{r['ttft_p50']:>12.2f}{r['ttft_p99']:>12.2f}{r['seconds']:>9.1f}"
                 f"   {r['vs_continuous']:.2f}x continuous"
                 + (f" (median of {len(r['vs_continuous_rounds'])} back-to-back pairs: "
                    + ", ".join(f"{x:.2f}" for x in r['vs_continuous_rounds']) + ")"
                    if len(r['vs_continuous_rounds']) > 1 else "")
                 + f", {r['vs_lockstep']:.2f}x lockstep "
                 f"(every request under a JSON schema; masks {r['mask_ms_per_token']:.2f} ms "
                 f"of host time per token), as many tokens: {r['same_lengths']}")
  if "structured_speculative" in rows:
    r = rows["structured_speculative"]
    lines.append(f"{'+ JSON k=' + str(r['k']):<12}{r['tokens_per_s']:>10.1f}"
                 f"{r['ttft_p50']:>12.2f}{r['ttft_p99']:>12.2f}{r['seconds']:>9.1f}"
                 f"   {r['vs_structured']:.2f}x JSON (proposals the grammar forces or prompt "
                 f"lookup finds, checked against it: {r['grammar_acceptance']:.1%} kept; masks "
                 f"{r['mask_ms_per_token']:.2f} ms of host time per token), outputs identical: "
                 f"{r['identical']}")
  lines.append(f"continuous / static throughput: {result['continuous_vs_static']:.2f}x; KV "
               f"utilisation {rows['continuous']['kv_utilisation']:.1%}; preemptions "
               f"{rows['continuous']['preemptions']}")
  for kind in weights[1:]:
    lines += _core_table(result["by_weights"][kind], kind)
  p = result["prefix"]
  lines.append(f"prefix cache ({p['requests']} requests sharing {p['system_tokens']} tokens): "
               f"{p['speedup']:.2f}x faster, TTFT p50 {p['ttft_p50_ratio']:.2f}x lower, "
               f"{p['prefix_hit_tokens']} prompt tokens reused, outputs identical: "
               f"{p['identical']}")
  m = result.get("interleaved")
  if m:
    for name in ("separate", "mixed"):
      r = m[name]
      lines.append(
          f"{m['streams']} streams + {m['long_prompt_tokens']}-token prompts arriving, {name} "
          f"steps: ITL p50 {r['itl_p50_ms']:.1f} ms, p99 {r['itl_p99_ms']:.1f} ms, max "
          f"{r['itl_max_ms']:.1f} ms; {r['stream_tokens_per_s']:.1f} stream tokens/s, "
          f"{r['prompt_tokens_per_s']:.0f} prompt tokens/s, long-prompt TTFT p50 "
          f"{r['long_ttft_p50']:.2f} s over {r['long_prompts']}")
    lines.append(f"mixed steps: ITL p99 {m['itl_p99_ratio']:.2f}x lower, p50 "
                 f"{m['itl_p50_ratio']:.2f}x lower, stream outputs identical: {m['identical']}")
  return "\n".join(lines)
