"""`python -m jaxllm.bench <suite> [--config=...] [--json] [--out=FILE]`

Suites: train (step time, tokens/s, MFU of the configured train step); attention (our
flash-attention kernel against cuDNN, XLA and JAX's bundled Pallas kernel, TFLOP/s and memory);
pipeline (the measured GPipe bubble against (p - 1) / (m + p - 1)); decode (generation
tokens/s beside Hugging Face transformers, and speculative decoding speedups); serve
(continuous against static batching, KV utilisation, prefix-cache speedup); moe (dispatch
modes, the grouped-matmul kernel, an expert-parallel train step); passkey (retrieval of a key
hidden in long filler text, per length and RoPE scaling); context (per-device memory of the
train step against sequence length under context parallelism, compiled, nothing run);
checkpoint (step time with synchronous and asynchronous saves against none, restore time from
disk and from host RAM).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

if sys.argv[1:2] in (["moe"], ["context"]) and (
    "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", "")):
  # The expert- and context-parallel steps want 8 devices; on CPU they are simulated (set
  # before JAX starts; other platforms ignore it).
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

from absl import app, flags

from jaxllm.cli import common

SUITES = ("train", "attention", "pipeline", "decode", "serve", "quant_matmul", "moe", "passkey",
          "context", "checkpoint")

_CONFIG = common.define_config_flag(common.default_experiment())
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of a table.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON result to this file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps); checkpoint: "
                              "per round.", lower_bound=1)
_SAVE_EVERY = flags.DEFINE_integer("save_every", 5, "checkpoint: steps between saves.",
                                   lower_bound=1)
_SEQ_LENS = flags.DEFINE_list(
    "seq_lens", None, "attention, context: sequence lengths (attention: 1024..16384 on GPU/TPU, "
    "256 on CPU; context: 512,1024,2048).")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "attention: head sizes.")
_PEERS = flags.DEFINE_list("peers", ["ours", "ours_mgpu", "xla", "cudnn", "jax_pallas",
                                     "jax_pallas_mgpu"],
                           "attention: implementations to measure.")
_CAUSAL = flags.DEFINE_list("causal", ["true", "false"], "attention: mask modes.")
_TOKENS = flags.DEFINE_integer("tokens", None, "attention: batch x seq_len per problem "
                               "(default 16384; 512 on CPU).", lower_bound=1)
_WIDTH = flags.DEFINE_integer("width", None, "attention: heads x head_dim (default 2048; 128 on "
                              "CPU).", lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 5, "attention, pipeline, decode: timed calls per "
                                "measurement; checkpoint: rounds.", lower_bound=1)
_STAGES = flags.DEFINE_list("stages", ["2", "4"], "pipeline: stage counts to measure.")
_PIPELINE_MEMORY = flags.DEFINE_list(
    "pipeline_memory", [], "pipeline: microbatch counts at which to compile each schedule "
    "(GPipe, circular, 1F1B) and report its memory (e.g. 4,8,16; empty: skip).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "decode, serve, passkey: model to load (default: "
                                  "SmolLM2-135M-Instruct via jaxllm.fetch).")
_RANDOM_INIT = flags.DEFINE_bool("random_init", False, "decode: random weights of --config's "
                                  "model, with --checkpoint's tokenizer (jaxllm peers only).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "32"], "decode: batch sizes.")
_DECODE_PEERS = flags.DEFINE_list("decode_peers", ["jaxllm_fp32", "jaxllm_bf16", "jaxllm_int8",
                                                   "jaxllm_int4", "transformers", "llama_cpp"],
                                  "decode: generators to measure (llama_cpp: when "
                                  "llama-cpp-python is installed, batch 1).")
_DRAFTS = flags.DEFINE_list("drafts", ["ngram:3", "layer_skip:10", "int4"],
                            "decode: speculative draft sources (ngram[:N], layer_skip:N, int4[:G], "
                            "int8, PATH).")
_SPECULATIVE_K = flags.DEFINE_integer("speculative_k", 4, "decode, serve: speculative draft "
                                      "tokens per step (serve: 0 leaves out the speculative "
                                      "rows).", lower_bound=0, upper_bound=16)
common.define_old_spelling("k", "speculative_k")
_PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 64, "decode: tokens per prompt.",
                                      lower_bound=1)
_MESH = flags.DEFINE_string("mesh", None, "serve: split the model over this mesh (tensor=4, "
                            "data=2,tensor=4); default one device.")
_REQUESTS = flags.DEFINE_integer("requests", 64, "serve: requests in the workload.",
                                 lower_bound=1)
_RATE = flags.DEFINE_float("rate", 8.0, "serve: mean arrivals per second.", lower_bound=0.01)
_PREFIX_REQUESTS = flags.DEFINE_integer("prefix_requests", 32, "serve: requests sharing a "
                                        "system prompt in the prefix-cache workload.",
                                        lower_bound=1)
_MAX_OUTPUT = flags.DEFINE_integer("max_output_tokens", 512, "serve: output lengths are drawn "
                                   "with mean a quarter of this and clipped to it.",
                                   # The engine's 1024-token context less the longest prompt.
                                   lower_bound=4, upper_bound=1024 - 128)
_DRAFT = flags.DEFINE_string("draft", "ngram", "serve: what proposes tokens in the speculative "
                             "row (ngram[:N], layer_skip:N, int4[:G], int8, PATH).")
common.define_old_spelling("serve_draft", "draft")
_LORA_ADAPTERS = flags.DEFINE_integer(
    "lora_adapters", 4, "serve: LoRA adapters the multi-LoRA row serves beside the base, "
    "requests taking each in turn (0: no such row).", lower_bound=0)
_LORA_RANK = flags.DEFINE_integer("lora_rank", 16, "serve: those adapters' rank.",
                                  lower_bound=1)
_STRUCTURED = flags.DEFINE_boolean("structured", True, "serve: a row of the same traffic with "
                                   "every request held to a JSON schema (structured output).")
_STRUCTURED_ROUNDS = flags.DEFINE_integer(
    "structured_rounds", 1, "serve: back-to-back (continuous, structured) pairs the structured "
    "row's ratio is the median of (1: against the continuous row).", lower_bound=1)
_INTERLEAVED = flags.DEFINE_boolean(
    "interleaved", True, "serve: rows of streams decoding while long prompts arrive, prompt "
    "chunks in steps of their own and riding in the decode steps (mixed steps): inter-token "
    "latency.")
_WEIGHTS = flags.DEFINE_list("weights", ["float32"], "serve: the weights the continuous, "
                             "lockstep, static and raw decode rows run with, each in turn "
                             "(float32, int8, int4: block weights rounded in memory, embedding "
                             "and head int8); the other rows use the first.")
_LONG_PROMPT = flags.DEFINE_integer("long_prompt_tokens", 512, "serve: the interleaved rows' "
                                    "arriving prompt length.", lower_bound=16)
_LENGTHS = flags.DEFINE_list("lengths", ["512", "1024", "2048"], "passkey: prompt lengths in "
                             "tokens.")
_TRIALS = flags.DEFINE_integer("trials", 4, "passkey: keys (random value and depth) per length.",
                               lower_bound=1)
_SCALINGS = flags.DEFINE_list("scalings", ["none"], "passkey: RoPE scalings to compare, none or "
                              "KIND:FACTOR (yarn:2, ntk:2, dynamic:2, linear:2).")
_KEEP_FREED_MEMORY = common.define_keep_freed_memory_flag()
_CONTEXTS = flags.DEFINE_list("contexts", ["1", "2", "4"], "context: mesh.context sizes.")
_TPU = flags.DEFINE_string("tpu", None, "context: compile for this Cloud TPU slice's chips "
                           "(e.g. v5p-8; needs libtpu, no TPU) instead of this host's devices.")
_STRATEGIES = flags.DEFINE_list("strategies", ["all_gather", "ring"],
                                "context: train.context_parallel strategies.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "decode: tokens generated per prompt.",
                                   lower_bound=1)


def _integers(flag, default: Sequence[str] = ()) -> tuple[int, ...]:
  """A list flag's values (or `default` when it is empty) as integers, refused in one line."""
  try:
    return tuple(int(x) for x in (flag.value or default))
  except ValueError as e:
    raise common.CommandError(f"--{flag.name} takes integers: {e}") from None


def _known(flag, choices: Sequence[str]) -> tuple[str, ...]:
  """A list flag's values, each one of `choices`, refused in one line otherwise."""
  unknown = set(flag.value) - set(choices)
  if unknown:
    raise common.CommandError(f"--{flag.name}: unknown {sorted(unknown)} (one of "
                              f"{tuple(choices)})")
  return tuple(flag.value)


def _attention_suite() -> tuple[dict, str]:
  import jax
  from jaxllm.bench import attention
  cpu = jax.default_backend() == "cpu"
  seq_lens = _integers(_SEQ_LENS, ["256"] if cpu else ["1024", "2048", "4096", "8192", "16384"])
  head_dims = _integers(_HEAD_DIMS)
  peers = _known(_PEERS, attention.PEERS)
  causal = [c.lower() in ("1", "true", "yes") for c in _CAUSAL.value]
  result = attention.run(seq_lens, head_dims, peers=peers, causal_modes=causal,
                         tokens=_TOKENS.value or (512 if cpu else 16384),
                         width=_WIDTH.value or (128 if cpu else 2048), repeats=_REPEATS.value)
  return result, attention.table(result)


@common.one_line_errors
def main(argv):
  common.positional(argv, "suite", SUITES)
  common.keep_freed_memory(_KEEP_FREED_MEMORY)
  if argv[1] == "attention":
    result, text = _attention_suite()
  elif argv[1] == "moe":
    import jax
    from jaxllm.bench import moe
    if jax.default_backend() == "gpu":  # Mixtral-like and fine-grained (64 experts, top-6)
      layer = [(8192, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6)]
      gmm = [(16384, 4096, 14336, 8), (16384, 14336, 4096, 8), (98304, 2048, 1408, 64)]
    else:
      layer, gmm = [(4096, 256, 384, 8, 2), (4096, 256, 128, 32, 4)], []
    result = moe.run(layer, gmm, repeats=_REPEATS.value)
    text = moe.table(result)
  elif argv[1] == "quant_matmul":
    import jax
    from jaxllm.bench import quant_matmul
    if jax.default_backend() == "gpu":
      shapes = [(m, i, o) for m in (1, 16, 64) for i, o in ((4096, 4096), (4096, 14336),
                                                             (14336, 4096))]
    else:
      shapes = [(1, 512, 128), (16, 512, 128)]
    result = quant_matmul.run(shapes, repeats=max(_REPEATS.value, 20 if shapes[0][1] > 512 else 2))
    text = quant_matmul.table(result)
  elif argv[1] == "serve":
    from jaxllm.bench import serve
    if _CHECKPOINT.value:
      path = _CHECKPOINT.value
    else:
      from jaxllm.fetch import fetch
      path = fetch("smollm2-135m")
    try:
      result = serve.run(path, requests=_REQUESTS.value, rate=_RATE.value,
                         prefix_requests=_PREFIX_REQUESTS.value,
                         speculative_k=_SPECULATIVE_K.value,
                         draft=_DRAFT.value, max_output_tokens=_MAX_OUTPUT.value,
                         mesh=_MESH.value, lora_adapters=_LORA_ADAPTERS.value,
                         lora_rank=_LORA_RANK.value, structured=_STRUCTURED.value,
                         structured_rounds=_STRUCTURED_ROUNDS.value,
                         interleaved=_INTERLEAVED.value, long_prompt_tokens=_LONG_PROMPT.value,
                         weights=tuple(_WEIGHTS.value))
    except ValueError as e:
      raise common.CommandError(str(e)) from None
    text = serve.table(result)
  elif argv[1] == "decode":
    from jaxllm.bench import decode
    batches = _integers(_BATCHES)
    peers = _known(_DECODE_PEERS, decode.PEERS)
    if _SPECULATIVE_K.value < 1:
      raise common.CommandError("decode: --speculative_k must be at least 1")
    if _CHECKPOINT.value:
      path = _CHECKPOINT.value
    else:
      from jaxllm.fetch import fetch
      path = fetch("smollm2-135m")
    random_cfg = None
    if _RANDOM_INIT.value:
      from jaxllm import config as config_lib
      random_cfg = common.experiment(_CONFIG).model
    try:
      result = decode.run(path, batches=batches, peers=peers,
                          drafts=tuple(_DRAFTS.value), k=_SPECULATIVE_K.value,
                          prompt_tokens=_PROMPT_TOKENS.value, new_tokens=_NEW_TOKENS.value,
                          repeats=_REPEATS.value, random_model_config=random_cfg)
    except ValueError as e:
      raise common.CommandError(str(e)) from None
    text = decode.table(result)
  elif argv[1] == "passkey":
    from jaxllm.bench import passkey
    lengths = _integers(_LENGTHS)
    try:
      path = _CHECKPOINT.value
      if not path:
        from jaxllm.fetch import fetch
        path = fetch("smollm2-135m")
      result = passkey.run(path, lengths=lengths, trials=_TRIALS.value,
                           scalings=tuple(_SCALINGS.value))
    except ValueError as e:  # ConfigError (a bad scaling) included
      raise common.CommandError(str(e)) from None
    text = passkey.table(result)
  elif argv[1] == "context":
    from jaxllm import config as config_lib
    from jaxllm.bench import context
    cfg = common.experiment(_CONFIG)
    seq_lens = _integers(_SEQ_LENS, ["512", "1024", "2048"])
    contexts = _integers(_CONTEXTS)
    strategies = _known(_STRATEGIES, config_lib.CONTEXT_PARALLEL)
    try:
      result = context.run(cfg, seq_lens=seq_lens, contexts=contexts, strategies=strategies,
                           tpu=_TPU.value)
    except ValueError as e:  # ConfigError (a length the ring cannot split) included
      raise common.CommandError(str(e)) from None
    text = context.table(result)
  elif argv[1] == "checkpoint":
    from jaxllm.bench import checkpoint
    cfg = common.experiment(_CONFIG)
    result = checkpoint.run(cfg, steps=_STEPS.value, save_every=_SAVE_EVERY.value,
                            rounds=_REPEATS.value)
    text = checkpoint.table(result)
  elif argv[1] == "pipeline":
    from jaxllm import config as config_lib
    from jaxllm.bench import pipeline
    cfg = common.experiment(_CONFIG)
    stages = _integers(_STAGES)
    result = pipeline.run(cfg, stages=stages, repeats=_REPEATS.value,
                          memory_microbatches=tuple(_integers(_PIPELINE_MEMORY, [])))
    text = pipeline.table(result)
  else:
    from jaxllm import config as config_lib
    cfg = common.experiment(_CONFIG)
    common.initialize_distributed()
    from jaxllm.bench import train
    result = train.run(cfg, steps=_STEPS.value)
    text = train.table(result)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)
  print(json.dumps(result) if _JSON.value else text)


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
