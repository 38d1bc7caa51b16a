"""Speculative decoding: a cheap draft proposes k tokens, the target checks them in one pass.

Each step, for every sequence of the batch at once (`steps.speculate_and_verify`, the function
the serving engine's speculative steps run too):
  1. t0 is drawn from the target's logits (from the residual norm(max(0, p - q)) when the last
     step rejected a proposal drawn from q);
  2. the draft proposes d_1..d_k autoregressively after t0 from its distributions q_1..q_k;
  3. the target scores [t0, d_1..d_k] in one forward pass -> p_1..p_k and the logits after;
  4. d_j is kept while u_j q_j(d_j) < p_j(d_j), up to the first rejection
     (`jaxllm.inference.acceptance`; Leviathan et al. 2023, Chen et al. 2023), and both caches
     roll back to t0 and the kept proposals (lengths only: see kv_cache).
The output is then distributed exactly as the target's own samples. Greedy rows use one-hot p
and q, which turns the same rule into "accept the longest prefix that equals the target's
argmax": the output is token for token that of greedy target decoding.

Draft sources (`Draft`): a smaller model with the same tokenizer, the target's own first
layers (layer-skip self-speculation: same embedding and head), and prompt lookup (the
continuation of the latest earlier occurrence of the context's last n-gram; q is one-hot).
Offline, `speculative_generate` runs the steps in one device loop (`device_loops`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.inference import device_loops
from jaxllm.inference import generate as gen
from jaxllm.inference import sampling
from jaxllm.parallel import placement

DRAFT_KINDS = ("model", "layer_skip", "ngram")


@dataclasses.dataclass(frozen=True)
class Draft:
  kind: str
  graphdef: Any = None
  params: Any = None
  max_ngram: int = 3

  def __post_init__(self):
    if self.kind not in DRAFT_KINDS:
      raise ValueError(f"draft kind {self.kind!r}: one of {', '.join(DRAFT_KINDS)}")


def model_draft(graphdef, params) -> Draft:
  """Any model with the target's tokenizer (vocabulary checked at generation)."""
  return Draft("model", graphdef, params)


def layer_skip_draft(graphdef, params, layers: int) -> Draft:
  """The target's first `layers` blocks, then its final norm and head (no new weights)."""
  from jaxllm.model import transformer
  cfg = gen.model_config(graphdef, params)
  if not 1 <= layers < cfg.n_layers:
    raise ValueError(f"layer-skip draft: layers={layers} must be in [1, {cfg.n_layers})")
  draft_cfg = dataclasses.replace(cfg, n_layers=layers)
  layout = transformer.layer_layout(draft_cfg)
  if cfg.n_experts and not layout.groups:  # the first layers hold no MoE layer
    draft_cfg = dataclasses.replace(draft_cfg, n_experts=0)
    layout = transformer.layer_layout(draft_cfg)
  draft_graphdef, _ = transformer.abstract_params(draft_cfg)
  # The first `layers` layers are prefixes of the dense and of the MoE stack.
  draft_params = {k: v for k, v in params.items() if k not in ("blocks", "moe_blocks")}
  if layout.n_dense:
    draft_params["blocks"] = jax.tree.map(lambda x: x[:layout.n_dense], params["blocks"])
  if layout.groups:
    draft_params["moe_blocks"] = jax.tree.map(lambda x: x[:layout.groups], params["moe_blocks"])
  return Draft("layer_skip", draft_graphdef, draft_params)


def ngram_draft(max_ngram: int = 3) -> Draft:
  """Prompt lookup: match the last n (max_ngram .. 1) tokens earlier in the context."""
  if max_ngram < 1:
    raise ValueError(f"max_ngram={max_ngram} must be >= 1")
  return Draft("ngram", max_ngram=max_ngram)


@dataclasses.dataclass
class Stats:
  iterations: int
  proposed: int
  accepted: int

  @property
  def acceptance_rate(self) -> float:
    return self.accepted / max(self.proposed, 1)


def speculative_generate(graphdef, params, prompts: Sequence[Sequence[int]],
                         sampling_params: Sequence[sampling.SamplingParams], draft: Draft, *,
                         k: int = 4, eos_id: int = -1, max_seq_len: int | None = None,
                         cache: str = "contiguous", page_size: int = 16,
                         prefill_chunk: int = 256, cache_dtype=jnp.float32,
                         on_tokens: gen.OnTokens | None = None
                         ) -> tuple[list[gen.Generation], Stats]:
  """Like `generate.generate_requests`, with `k` draft tokens verified per target pass (on the
  params' mesh when they are placed on one; a model draft must be placed on the same)."""
  mesh = placement.mesh_of(params)
  gen.check_on_tokens(on_tokens, mesh)
  with placement.in_mesh(mesh):
    return _speculative_generate(graphdef, params, prompts, sampling_params, draft, k=k,
                                 eos_id=eos_id, max_seq_len=max_seq_len, cache=cache,
                                 page_size=page_size, prefill_chunk=prefill_chunk,
                                 cache_dtype=cache_dtype, mesh=mesh, on_tokens=on_tokens)


def _speculative_generate(graphdef, params, prompts, sampling_params, draft, *, k, eos_id,
                          max_seq_len, cache, page_size, prefill_chunk, cache_dtype, mesh,
                          on_tokens):
  if not 1 <= k <= 16:
    raise ValueError(f"k={k}: speculate 1 to 16 tokens per step")
  if any(sp.uses_penalties for sp in sampling_params):
    raise ValueError("speculative decoding does not take repetition/frequency/presence "
                     "penalties (they change the distribution token by token)")
  cfg = gen.model_config(graphdef, params)
  gen.check_prompts(prompts, sampling_params, cfg.vocab_size, max_seq_len)
  chunk = gen.chunk_size(max(len(p) for p in prompts), prefill_chunk)
  padded = -(-max(len(p) for p in prompts) // chunk) * chunk
  max_new = max(sp.max_tokens for sp in sampling_params)
  S = gen.bucket(padded + max_new + k + 1)
  needed = [len(p) + sp.max_tokens + k + 1 for p, sp in zip(prompts, sampling_params)]
  step = max(chunk, k + 1)  # prefill chunks; k proposals verified with the last token
  t_cache = gen.new_cache(cfg, cache, needed, max_len=S, page_size=page_size, dtype=cache_dtype,
                          mesh=mesh, longest_step=step)
  first, t_cache = gen.prefill(graphdef, params, prompts, t_cache, prefill_chunk=prefill_chunk,
                               vocab_size=cfg.vocab_size)
  d_graphdef = d_params = d_cache = None
  if draft.kind != "ngram":
    d_graphdef, d_params = draft.graphdef, draft.params
    d_cfg = gen.model_config(d_graphdef, d_params)
    if d_cfg.vocab_size != cfg.vocab_size:
      raise ValueError(f"draft vocabulary {d_cfg.vocab_size} differs from the target's "
                       f"{cfg.vocab_size}: the draft needs the target's tokenizer")
    d_cache = gen.new_cache(d_cfg, cache, needed, max_len=S, page_size=page_size,
                            dtype=cache_dtype, mesh=mesh, longest_step=step)
    _, d_cache = gen.prefill(d_graphdef, d_params, prompts, d_cache,
                             prefill_chunk=prefill_chunk, vocab_size=cfg.vocab_size)
  hist, _ = gen.pad_prompts(prompts, 1)
  H = gen.bucket(hist.shape[1] + max_new + k + 1)
  hist = np.pad(hist, ((0, 0), (0, H - hist.shape[1])))
  out_len = gen.bucket(max_new)
  out, logp, n, reason, it, proposed, accepted = jax.device_get(device_loops.speculative_loop(
      graphdef, params, d_graphdef, d_params, t_cache, d_cache, first, jnp.asarray(hist),
      sampling.SamplingArrays.of(sampling_params),
      jnp.asarray([sp.max_tokens for sp in sampling_params], jnp.int32),
      jnp.asarray(gen.stop_id_array(sampling_params, eos_id)), k=k, out_len=out_len,
      max_ngram=draft.max_ngram, on_tokens=on_tokens))
  results = [gen.Generation(out[b, :n[b]].tolist(), logp[b, :n[b]].tolist(),
                            gen.FINISH_REASONS.get(int(reason[b]), "length"))
             for b in range(len(prompts))]
  return results, Stats(int(it), int(proposed.sum()), int(accepted.sum()))
