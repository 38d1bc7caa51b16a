"""`jaxllm.bench decode`: generation throughput beside Hugging Face, and speculative speedups.

Workload: B prompts, each the first `prompt_tokens` tokens of a different Python stdlib file
(fixed list), continued greedily by exactly `new_tokens` tokens (no early stop, so every peer
does the same work). tokens/s = B * new_tokens / wall time of the whole call (prefill
included), timed after one warm-up call that compiles: the best of `repeats` rounds, each
round timing every peer once in turn. decode tokens/s
leaves the prompt out: B * (new_tokens - 1) / (that time - the time of the same call with one
new token). Peers, same weights and prompts:
  jaxllm_fp32   float32 params and compute (the default)
  jaxllm_bf16   params cast to bfloat16, bfloat16 compute
  jaxllm_int8   block weights int8 per channel, embedding/tied head int8 per vocab row
                (round to nearest), float32 compute
  jaxllm_int4   block weights int4 in groups of 128, embedding/tied head int8 per row
  jaxllm_bf16_int4  jaxllm_int4's weights with bfloat16 compute (on a GPU, the int4 products
                take the fused Pallas kernel: its bandwidth inside decoding)
  transformers  `model.generate` (torch, float32, all CPU threads)
  llama_cpp     llama.cpp through `llama-cpp-python` (when installed), the GGUF file itself
                (its own quantization), all CPU threads, greedy; batch 1 only
Every row also reports the bytes a decode step must read per token (its weights, the
embedding only where tied, plus the KV cache of the average live context) and the fraction
of the machine's bandwidth bound that its decode rate reaches: bytes/token x decode tokens/s /
the copy bandwidth measured in the same run (`timing.copy_bandwidth_gbps`). Batch B reads the
weights once for B tokens, so only batch 1 is bandwidth-bound.
With `random_model` (a ModelConfig) the weights are that model's random initialisation (float32,
vocabulary resized to the tokenizer's) and only the tokenizer comes from `path`: decoding speed
of a model size no checkpoint on the machine has (jaxllm peers only; outputs are noise).
Speculative rows run batch 1 (greedy) per draft source and report the speedup over plain
jaxllm_fp32 decoding of the same prompts, the acceptance rate, tokens per target pass, and
whether the output equals plain greedy decoding token for token.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp

from jaxllm.bench import timing
from jaxllm.ops import cpu_gemv

PEERS = ("jaxllm_fp32", "jaxllm_bf16", "jaxllm_int8", "jaxllm_int4", "jaxllm_bf16_int4",
         "transformers", "llama_cpp")
# The quantized peers' embedding/tied head: int8, one scale per vocab row.
HEAD_BITS = 8


def stdlib_prompts(tokenizer, count: int, length: int, bos: int | None) -> list[list[int]]:
  """`count` prompts of exactly `length` tokens from the starts of stdlib files."""
  from jaxllm.data import corpus
  prompts = []
  for path in corpus.stdlib_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      ids = tokenizer.encode(f.read(20_000))
    ids = ([bos] if bos is not None else []) + ids
    if len(ids) >= length:
      prompts.append(ids[:length])
    if len(prompts) == count:
      return prompts
  raise RuntimeError(f"found only {len(prompts)} stdlib files with {length} tokens")


def _bf16(model):
  """`model` with bfloat16 params and compute."""
  from jaxllm.model import transformer
  cfg = dataclasses.replace(model.config, dtype="bfloat16", param_dtype="bfloat16")
  graphdef, _ = transformer.abstract_params(cfg)
  return dataclasses.replace(model, config=cfg, graphdef=graphdef,
                             params=jax.tree.map(lambda x: x.astype(jnp.bfloat16), model.params))


def random_model(cfg, path: str):
  """A LoadedModel of `cfg` (float32) with random weights and the tokenizer of checkpoint
  `path`, its vocabulary resized to that tokenizer's."""
  from jaxllm import api
  from jaxllm.checkpoint import convert
  from jaxllm.model import transformer
  tokenizer = convert.read_tokenizer(path)  # its weights are never read
  cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size, dtype="float32",
                            param_dtype="float32")
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  return api.LoadedModel(cfg, graphdef, params, tokenizer, kind="random")


def interleaved(calls: dict, repeats: int) -> tuple[dict, dict]:
  """Best wall time and last output of each no-argument call, timed round-robin.

  Every call runs once first (compiles), then `repeats` rounds time each call once in turn,
  so a slow spell of a shared machine hits all peers alike instead of one.
  """
  outputs = {name: fn() for name, fn in calls.items()}
  best = {name: float("inf") for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      t = time.perf_counter()
      outputs[name] = fn()
      best[name] = min(best[name], time.perf_counter() - t)
  return best, outputs


def jaxllm_call(graphdef, params, prompts, new_tokens, draft=None, k=4):
  """A no-argument callable running one generation -> (outputs, speculative stats or None)."""
  from jaxllm.inference import generate as gen
  from jaxllm.inference import sampling, speculative
  sp = [sampling.SamplingParams(max_tokens=new_tokens)] * len(prompts)
  if draft is None:
    return lambda: (gen.generate_requests(graphdef, params, prompts, sp), None)
  return lambda: speculative.speculative_generate(graphdef, params, prompts, sp, draft, k=k)


@functools.lru_cache(maxsize=1)
def _transformers_model(path):
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count() or 1)
  if path.endswith(".gguf"):
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
  else:
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
  return hf.eval()


def _transformers_call(path, prompts, new_tokens):
  import torch
  hf = _transformers_model(path)
  ids = torch.tensor(prompts)

  def call():
    with torch.no_grad():
      out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return [row[len(prompts[0]):] for row in out.tolist()], None
  return call


@functools.lru_cache(maxsize=1)
def _llama_cpp_model(path, n_ctx):
  import llama_cpp
  threads = os.cpu_count() or 1
  return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_threads=threads,
                         n_threads_batch=threads, verbose=False)


def _llama_cpp_call(path, prompts, new_tokens):
  llm = _llama_cpp_model(path, len(prompts[0]) + new_tokens)

  def call():
    outs = []
    for prompt in prompts:
      llm.reset()  # no KV reuse from the previous call: every call prefills its prompt
      out = []
      for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == new_tokens:
          break
      outs.append(out)
    return outs, None
  return call


def _gguf_tensor_bytes(path: str) -> int:
  import gguf
  return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def weight_bytes_per_token(params, cfg) -> int:
  """Weight bytes one batch-1 decode step reads: all of them, except that an untied
  embedding table is only looked up (a row per token)."""
  from jaxllm.quant import tensor as qtensor
  total = qtensor.tree_nbytes(params)
  return total if cfg.tie_embeddings else total - qtensor.tree_nbytes(params["embed"])


def kv_bytes_per_position(cfg, itemsize: int) -> int:
  """K and V of one position, every layer."""
  return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def run(path: str, *, batches=(1, 8, 32), peers=PEERS, drafts=("ngram:3", "layer_skip:10"),
        k: int = 4, prompt_tokens: int = 64, new_tokens: int = 64, repeats: int = 1,
        random_model_config=None) -> dict:
  import jaxllm
  from jaxllm.inference import traces
  if random_model_config is not None:
    model = random_model(random_model_config, path)
  else:
    model = jaxllm.load(path)
  tok = model.tokenizer
  bos = tok.bos_id if tok.add_bos and tok.bos_id >= 0 else None
  prompts = stdlib_prompts(tok, max(batches), prompt_tokens, bos)
  cfg = model.config
  live = prompt_tokens + (new_tokens - 1) / 2  # average context a decode step attends to
  # A float32-cache peer's bytes per token: its weights plus K/V of the live context.
  read = lambda params: weight_bytes_per_token(params, cfg) + live * kv_bytes_per_position(cfg, 4)
  errors, calls, bytes_per_token = {}, {}, {}
  for peer in peers:
    peer_batches = batches
    if random_model_config is not None and not peer.startswith("jaxllm"):
      errors[peer] = "random weights: jaxllm peers only"
      continue
    if peer == "llama_cpp":
      try:
        import llama_cpp  # noqa: F401
      except ImportError as e:
        errors[peer] = f"{type(e).__name__}: {e} (pip install llama-cpp-python)"
        continue
      if not path.endswith(".gguf"):
        errors[peer] = "needs a GGUF checkpoint"
        continue
      make = functools.partial(_llama_cpp_call, path)
      peer_batches = [B for B in batches if B == 1]  # it decodes one sequence at a time
      bytes_per_token[peer] = _gguf_tensor_bytes(path) + live * kv_bytes_per_position(cfg, 2)
    elif peer == "transformers":
      try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
      except ImportError as e:
        errors[peer] = f"{type(e).__name__}: {e}"
        continue
      make = functools.partial(_transformers_call, path)
      bytes_per_token[peer] = read(model.params)
    elif peer in ("jaxllm_bf16", "jaxllm_bf16_int4"):
      low = _bf16(model)
      if peer.endswith("int4"):
        low = low.quantized(4, head_bits=HEAD_BITS)
      make = functools.partial(jaxllm_call, low.graphdef, low.params)
      bytes_per_token[peer] = read(low.params)
    elif peer == "jaxllm_fp32":
      make = functools.partial(jaxllm_call, model.graphdef, model.params)
      bytes_per_token[peer] = read(model.params)
    elif peer in ("jaxllm_int8", "jaxllm_int4"):
      low = model.quantized(int(peer[-1]), head_bits=HEAD_BITS)
      make = functools.partial(jaxllm_call, low.graphdef, low.params)
      bytes_per_token[peer] = read(low.params)
    else:
      raise ValueError(f"unknown peer {peer!r} (one of {', '.join(PEERS)})")
    for B in peer_batches:
      calls[peer, B, new_tokens] = make(prompts[:B], new_tokens)
      calls[peer, B, 1] = make(prompts[:B], 1)
  for spec in drafts or ():
    calls["spec", spec] = jaxllm_call(model.graphdef, model.params, prompts[:1], new_tokens,
                                      model.draft(spec), k)
  bandwidth = timing.copy_bandwidth_gbps()
  best, outputs = interleaved(calls, repeats)
  bandwidth = max(bandwidth, timing.copy_bandwidth_gbps())  # before and after: the better

  rows = []
  tokens = lambda out: [o if isinstance(o, list) else o.tokens for o in out[0]]
  for peer in peers:
    for B in batches:
      if (peer, B, new_tokens) not in best:
        continue
      seconds, first_s = best[peer, B, new_tokens], best[peer, B, 1]
      decode_rate = B * (new_tokens - 1) / max(seconds - first_s, 1e-9)
      rows.append(dict(peer=peer, batch=B, seconds=seconds, prefill_seconds=first_s,
                       tokens_per_s=B * new_tokens / seconds, decode_tokens_per_s=decode_rate,
                       bytes_per_token=int(bytes_per_token[peer]),
                       bandwidth_fraction=(bytes_per_token[peer] * decode_rate
                                           / (bandwidth * 1e9) if B == 1 else None)))
  by = {(r["peer"], r["batch"]): r for r in rows}
  for r in rows:
    base = by.get(("transformers", r["batch"]))
    llama = by.get(("llama_cpp", r["batch"]))
    one = by.get((r["peer"], 1))
    for key in ("tokens_per_s", "decode_tokens_per_s"):
      prefix = "" if key == "tokens_per_s" else "decode_"
      r[f"{prefix}vs_transformers"] = r[key] / base[key] if base else None
      r[f"{prefix}vs_llama_cpp"] = r[key] / llama[key] if llama else None
      r[f"{prefix}scaling_vs_batch1"] = r[key] / one[key] if one else None
  spec_rows = []
  if drafts:
    if ("jaxllm_fp32", 1, new_tokens) not in best:
      raise ValueError("speculative rows compare against jaxllm_fp32 at batch 1: keep both")
    plain_s = best["jaxllm_fp32", 1, new_tokens]
    plain = tokens(outputs["jaxllm_fp32", 1, new_tokens])[0]
    for spec in drafts:
      seconds, (out, st) = best["spec", spec], outputs["spec", spec]
      spec_rows.append(dict(draft=spec, k=k, seconds=seconds, plain_seconds=plain_s,
                            speedup=plain_s / seconds, acceptance_rate=st.acceptance_rate,
                            tokens_per_target_pass=new_tokens / max(st.iterations + 1, 1),
                            identical=out[0].tokens == plain))
  # The CPU kernel must not change what a model generates: each jaxllm peer's batch-1 output
  # again with XLA's products (every jitted function traced anew, under "never").
  same_on_xla = {}
  if jax.default_backend() == "cpu" and cpu_gemv.available():
    jax.clear_caches()
    with cpu_gemv.cpu_kernel("never"):
      for peer in peers:
        if peer.startswith("jaxllm") and (peer, 1, new_tokens) in calls:
          again = calls[peer, 1, new_tokens]()
          same_on_xla[peer] = tokens(again) == tokens(outputs[peer, 1, new_tokens])
    jax.clear_caches()
  # llama.cpp decodes its own quantization, so its tokens may part from ours: how many of the
  # first agree with jaxllm_fp32's (a sanity check that both continue the same prompt).
  agreement = None
  if ("llama_cpp", 1, new_tokens) in outputs and ("jaxllm_fp32", 1, new_tokens) in outputs:
    ours, theirs = (tokens(outputs[p, 1, new_tokens])[0] for p in ("jaxllm_fp32", "llama_cpp"))
    agreement = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                     min(len(ours), len(theirs)))
  matches = {B: tokens(outputs["jaxllm_fp32", B, new_tokens])
             == tokens(outputs["transformers", B, new_tokens])
             for B in batches if ("jaxllm_fp32", B, new_tokens) in outputs
             and ("transformers", B, new_tokens) in outputs}
  name = path if random_model_config is None else (
      f"random {sum(x.size for x in jax.tree.leaves(model.params)) / 1e6:,.1f}M params")
  return dict(suite="decode", checkpoint=name, backend=jax.default_backend(),
              prompt_tokens=prompt_tokens, new_tokens=new_tokens, rows=rows,
              speculative=spec_rows, compiles=traces.trace_counts(), errors=errors,
              repeats=repeats, greedy_matches_transformers=matches,
              greedy_matches_xla_path=same_on_xla, copy_bandwidth_gbps=bandwidth,
              llama_cpp_leading_tokens_equal_fp32=agreement)


def table(result: dict) -> str:
  lines = [f"decode: {result['checkpoint']} on {result['backend']}, "
           f"{result['prompt_tokens']} prompt + {result['new_tokens']} new tokens, greedy; "
           f"copy bandwidth {result['copy_bandwidth_gbps']:.1f} GB/s",
           f"{'':<23}{'| whole call (prefill included)':<28}{'| decode only':<52}",
           f"{'peer':<17}{'batch':>6}{'tokens/s':>11}{'vs transf.':>11}{'tokens/s':>11}"
           f"{'vs transf.':>11}{'vs llama.cpp':>13}{'vs batch 1':>11}{'MB/token':>10}"
           f"{'of bw bound':>12}"]
  def fmt(x, spec, unit=""):
    if x is None:  # as wide as a number would be
      return format("-", spec.split(".")[0]) + " " * len(unit)
    return format(x, spec) + unit
  for r in result["rows"]:
    lines.append(
        f"{r['peer']:<17}{r['batch']:>6}{r['tokens_per_s']:>11.1f}"
        f"{fmt(r['vs_transformers'], '>10.2f', 'x')}{r['decode_tokens_per_s']:>11.1f}"
        f"{fmt(r['decode_vs_transformers'], '>10.2f', 'x')}"
        f"{fmt(r['decode_vs_llama_cpp'], '>12.2f', 'x')}"
        f"{fmt(r['decode_scaling_vs_batch1'], '>10.2f', 'x')}"
        f"{r['bytes_per_token'] / 1e6:>10.1f}{fmt(r['bandwidth_fraction'], '>12.0%')}")
  if result["speculative"]:
    lines.append(f"{'draft (batch 1)':<18}{'k':>3}{'speedup':>9}{'accepted':>10}"
                 f"{'tok/pass':>10}{'identical':>11}")
    for r in result["speculative"]:
      lines.append(f"{r['draft']:<18}{r['k']:>3}{r['speedup']:>8.2f}x"
                   f"{r['acceptance_rate']:>10.1%}{r['tokens_per_target_pass']:>10.2f}"
                   f"{str(r['identical']):>11}")
  lines.append(f"greedy output equals transformers': {result['greedy_matches_transformers']}")
  if result["llama_cpp_leading_tokens_equal_fp32"] is not None:
    lines.append("llama.cpp's first tokens equal to jaxllm_fp32's: "
                 f"{result['llama_cpp_leading_tokens_equal_fp32']} of {result['new_tokens']}")
  if result["greedy_matches_xla_path"]:
    lines.append("batch-1 greedy output with the CPU kernel equals XLA's products': "
                 f"{result['greedy_matches_xla_path']}")
  lines.append(f"compiled functions: {result['compiles']}")
  for peer, err in result["errors"].items():
    lines.append(f"{peer}: not measured ({err})")
  return "\n".join(lines)
