"""Next-token sampling with per-sequence parameters inside one batch.

`SamplingParams` is one request's settings (host side, validated); `SamplingArrays` is a batch
of them as device arrays, so sequences with different temperatures, filters, penalties and
seeds share one compiled step. Order of processing, as in vLLM and HF:
penalties -> temperature -> top-k -> top-p -> min-p -> draw.

Randomness is per request: the draw for a sequence's n-th generated token uses
`fold_in(PRNGKey(seed), n)`, so a request gives the same output whatever batch it shares and
wherever it sits in it.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.inference import text_stream

_NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """One request's sampling settings. temperature 0 = greedy; 0 / 1.0 turn filters off.

  repetition_penalty (HF): logits of tokens seen in the prompt or output are divided by it when
  positive, multiplied when negative. frequency / presence penalties (OpenAI): subtract
  penalty * count / penalty * [count > 0] over the generated tokens. stop_token_ids end the
  sequence (not included in the output); stop strings are matched on the decoded text by the
  caller that has a tokenizer (`apply_stop_strings`). logit_bias (OpenAI): (token id, bias in
  [-100, 100]) pairs added to the logits before the draw (the engine's; -100 all but bans a
  token, +100 all but forces it); logprobs stay the model's own. min_tokens (the engine's):
  neither the end of sequence nor a stop token is drawn before that many tokens. ignore_eos:
  the end-of-sequence token is an ordinary token (the request runs to max_tokens).
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  frequency_penalty: float = 0.0
  presence_penalty: float = 0.0
  seed: int = 0
  max_tokens: int = 64
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()
  logit_bias: tuple[tuple[int, float], ...] = ()
  min_tokens: int = 0
  ignore_eos: bool = False

  def __post_init__(self):
    checks = [
        (self.temperature >= 0, f"temperature={self.temperature} must be >= 0"),
        # Both become int32 arrays in the engine's step: larger would crash it, not the request.
        (0 <= self.top_k < 2 ** 31, f"top_k={self.top_k} must be in [0, 2**31) (0 = off)"),
        (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
        (0 <= self.min_p <= 1, f"min_p={self.min_p} must be in [0, 1]"),
        (self.repetition_penalty > 0,
         f"repetition_penalty={self.repetition_penalty} must be > 0"),
        (-2 <= self.frequency_penalty <= 2,
         f"frequency_penalty={self.frequency_penalty} must be in [-2, 2]"),
        (-2 <= self.presence_penalty <= 2,
         f"presence_penalty={self.presence_penalty} must be in [-2, 2]"),
        (1 <= self.max_tokens < 2 ** 31, f"max_tokens={self.max_tokens} must be in [1, 2**31)"),
        (0 <= self.seed < 2 ** 63, f"seed={self.seed} must be in [0, 2**63)"),
        (0 <= self.min_tokens <= self.max_tokens,
         f"min_tokens={self.min_tokens} must be in [0, max_tokens={self.max_tokens}]"),
    ]
    for ok, message in checks:
      if not ok:
        raise ValueError(message)
    object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
    if any(not s for s in stop):
      raise ValueError("stop strings must be non-empty")
    object.__setattr__(self, "stop", stop)
    pairs = (self.logit_bias.items() if isinstance(self.logit_bias, dict)
             else self.logit_bias)
    bias = tuple(sorted((int(t), float(b)) for t, b in pairs))
    for t, b in bias:
      if not 0 <= t < 2 ** 31 or not -100 <= b <= 100:
        raise ValueError(f"logit_bias {{{t}: {b}}}: token ids must be >= 0 and biases in "
                         "[-100, 100]")
    object.__setattr__(self, "logit_bias", bias)

  @property
  def uses_penalties(self) -> bool:
    return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0)


class SamplingArrays(NamedTuple):
  """A batch of SamplingParams as `[B]` arrays (keys `[B, 2]` uint32)."""
  temperature: jax.Array
  top_k: jax.Array
  top_p: jax.Array
  min_p: jax.Array
  repetition_penalty: jax.Array
  frequency_penalty: jax.Array
  presence_penalty: jax.Array
  keys: jax.Array

  @staticmethod
  def of(params: Sequence[SamplingParams]) -> "SamplingArrays":
    f32 = lambda name: jnp.asarray([getattr(p, name) for p in params], jnp.float32)
    keys = np.stack([seed_key(p.seed) for p in params])
    return SamplingArrays(
        temperature=f32("temperature"),
        top_k=jnp.asarray([p.top_k for p in params], jnp.int32),
        top_p=f32("top_p"), min_p=f32("min_p"), repetition_penalty=f32("repetition_penalty"),
        frequency_penalty=f32("frequency_penalty"), presence_penalty=f32("presence_penalty"),
        keys=jnp.asarray(keys, jnp.uint32))


def seed_key(seed: int) -> np.ndarray:
  """`jax.random.PRNGKey(seed)` (threefry: high and low 32 bits), computed on the host."""
  return np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32)


def apply_penalties(logits_BV: jax.Array, arrays: SamplingArrays, counts_BV: jax.Array,
                    prompt_mask_BV: jax.Array) -> jax.Array:
  """Repetition (over prompt and output), frequency and presence (over output) penalties."""
  seen_BV = prompt_mask_BV | (counts_BV > 0)
  rp_B1 = arrays.repetition_penalty[:, None]
  penalised = jnp.where(logits_BV > 0, logits_BV / rp_B1, logits_BV * rp_B1)
  logits_BV = jnp.where(seen_BV, penalised, logits_BV)
  logits_BV = logits_BV - arrays.frequency_penalty[:, None] * counts_BV
  return logits_BV - arrays.presence_penalty[:, None] * (counts_BV > 0)


def apply_token_mask(logits_BV: jax.Array, mask_BW: jax.Array) -> jax.Array:
  """Logits of tokens a row's bitmask leaves out set to -1e30 (`[B, W]` int32, bit j of word
  i allows token 32 i + j: `jaxllm.inference.grammar`'s layout; a row of -1 allows all)."""
  B, V = logits_BV.shape
  bits_BW32 = (mask_BW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)[None, None, :]) & 1
  allowed_BV = bits_BW32.reshape(B, -1)[:, :V].astype(bool)
  return jnp.where(allowed_BV, logits_BV, _NEG_INF)


def _filter_sorted(logits_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """Top-k then top-p with per-row k and p, through one descending sort."""
  V = logits_BV.shape[-1]
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
  kth_B1 = jnp.take_along_axis(sorted_BV, (k_B - 1)[:, None], axis=-1)
  in_top_k_BV = jnp.arange(V)[None, :] < k_B[:, None]
  probs_BV = jax.nn.softmax(jnp.where(in_top_k_BV, sorted_BV, _NEG_INF), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  # The smallest logit inside the nucleus (the most likely token always stays); ties kept.
  inside_BV = (mass_before_BV < top_p_B[:, None]) & in_top_k_BV
  cutoff_B1 = jnp.min(jnp.where(inside_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  cutoff_B1 = jnp.maximum(cutoff_B1, kth_B1)
  return jnp.where(logits_BV < cutoff_B1, _NEG_INF, logits_BV)


def process(logits_BV: jax.Array, arrays: SamplingArrays) -> jax.Array:
  """Temperature-scaled, top-k / top-p / min-p filtered float32 logits (penalties excluded).

  Rows with temperature 0 are left unscaled (the caller takes their argmax). The sort behind
  top-k/top-p runs only when some row asks for it.
  """
  logits_BV = logits_BV.astype(jnp.float32)
  t_B1 = arrays.temperature[:, None]
  logits_BV = jnp.where(t_B1 > 0, logits_BV / jnp.maximum(t_B1, 1e-6), logits_BV)
  needs_sort = jnp.any((arrays.top_k > 0) | (arrays.top_p < 1.0))
  logits_BV = jax.lax.cond(needs_sort, _filter_sorted, lambda x, k, p: x, logits_BV,
                           arrays.top_k, arrays.top_p)
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  # p >= min_p * p_max  <=>  logit >= max + log(min_p)
  floor_B1 = max_B1 + jnp.log(jnp.maximum(arrays.min_p[:, None], 1e-30))
  keep_BV = (logits_BV >= floor_B1) | (arrays.min_p[:, None] <= 0)
  return jnp.where(keep_BV, logits_BV, _NEG_INF)


def probabilities(logits_BV: jax.Array, arrays: SamplingArrays) -> jax.Array:
  """The distribution a row samples from: softmax of `process`, one-hot argmax when greedy."""
  processed = process(logits_BV, arrays)
  one_hot = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1])
  return jnp.where(arrays.temperature[:, None] > 0, jax.nn.softmax(processed, axis=-1), one_hot)


def row_keys(arrays: SamplingArrays, step_B: jax.Array) -> jax.Array:
  """`[B, 2]` keys for each row's `step_B[b]`-th generated token."""
  return jax.vmap(lambda k, s: jax.random.fold_in(k, s))(arrays.keys, step_B)


def draw(logits_BV: jax.Array, arrays: SamplingArrays, keys_B2: jax.Array) -> jax.Array:
  """`[B]` int32 tokens from processed logits (argmax where temperature is 0)."""
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

  def sampled():
    processed = process(logits_BV, arrays)
    return jax.vmap(lambda k, l: jax.random.categorical(k, l))(keys_B2, processed).astype(
        jnp.int32)

  # Greedy batches skip the filters and the draw altogether.
  drawn_B = jax.lax.cond(jnp.any(arrays.temperature > 0), sampled, lambda: greedy_B)
  return jnp.where(arrays.temperature > 0, drawn_B, greedy_B)


def token_logprobs(logits_BV: jax.Array, tokens_B: jax.Array) -> jax.Array:
  """log p(token) under the model's own (unprocessed) distribution, `[B]` float32."""
  logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp_BV, tokens_B[:, None], axis=-1)[:, 0]


def uniform(batch: int, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            min_p: float = 0.0, seed: int = 0) -> SamplingArrays:
  """Arrays for `batch` rows with the same settings (and the same seed)."""
  return SamplingArrays.of([SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                           min_p=min_p, seed=seed)] * batch)


def filter_logits(logits_BV: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Logits outside the top-k and the top-p nucleus set to -1e30 (same k and p for all rows)."""
  B = logits_BV.shape[0]
  return _filter_sorted(logits_BV.astype(jnp.float32), jnp.full((B,), top_k, jnp.int32),
                        jnp.full((B,), top_p, jnp.float32))


def sample(logits_BV: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """`[B]` int32 tokens with one key for the batch; temperature <= 0 means greedy."""
  B = logits_BV.shape[0]
  arrays = uniform(B, temperature=max(float(temperature), 0.0), top_k=top_k, top_p=top_p)
  return draw(logits_BV, arrays, jax.random.split(key, B))


def apply_stop_strings(ids: Sequence[int], stops: Sequence[str], decode) -> tuple[list[int], str,
                                                                                  bool]:
  """Cuts a generation at the first stop string: `(ids, text, stopped)`.

  text ends before the stop string; ids are the shortest prefix whose text reaches it (so a
  streaming client and this agree on where the output ended).
  """
  ids = list(ids)
  text = decode(ids)
  cut = text_stream.first_stop(text, stops)
  if cut < 0:
    return ids, text, False
  n = next(n for n in range(len(ids) + 1) if len(decode(ids[:n])) > cut)
  return ids[:n], text[:cut], True
