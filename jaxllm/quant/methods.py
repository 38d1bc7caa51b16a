"""Quantize a whole model: round-to-nearest, GPTQ or AWQ, per `QuantSpec`.

GPTQ and AWQ walk the layers in order with calibration rows (`calibrate.calibration_rows`):
  gptq  each layer's Hessians come from its inputs as the already-quantized layers before it
        produce them; its weights are quantized by `gptq.gptq_quantize`, and the quantized
        layer produces the next layer's inputs.
  awq   for each group of weights sharing an input (q/k/v, gate/up, down; o only without GQA,
        where v's output channels line up with o's inputs) a per-input-channel scale
        s = mean|x|^a, a searched on a grid, multiplies the weight rows and divides the op
        before them (the RMSNorm scale, or up's / v's output columns), so the product is
        unchanged in full precision and the salient channels lose less to rounding; the
        scaled weights are then rounded to nearest.
MoE layers' experts are calibrated on the tokens routed to them (GPTQ: one Hessian per expert;
AWQ: see `_awq_scale`).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxllm.quant import calibrate, gptq
from jaxllm.quant import params as qparams
from jaxllm.quant import tensor as qtensor

# Which calibration input each block weight multiplies.
INPUT_OF = {"attn/q": "qkv", "attn/k": "qkv", "attn/v": "qkv", "attn/o": "o",
            "mlp/gate": "gate_up", "mlp/up": "gate_up", "mlp/down": "down"}


def quantize_model(graphdef, params: dict, spec: qparams.QuantSpec, calib_rows=None, *,
                   act_order: bool = False, damp: float = 0.01, chunk_rows: int = 8,
                   progress: bool = True) -> tuple[dict, qparams.QuantSpec]:
  """-> (params with QTensors, the spec with `quantized` filled in)."""
  if spec.method == "rtn":
    return qparams.quantize_params(params, spec)
  if calib_rows is None:
    raise ValueError(f"method={spec.method} needs calibration rows")
  if spec.method == "gptq":
    return _gptq(graphdef, params, spec, calib_rows, act_order=act_order, damp=damp,
                 chunk_rows=chunk_rows, progress=progress)
  scaled, ratios = _awq_scale(graphdef, params, spec, calib_rows, chunk_rows=chunk_rows,
                              progress=progress)

  def quantize(path, w, in_axes, batch_axes):
    return qtensor.quantize(w, bits=spec.bits, group_size=spec.group_size,
                            symmetric=spec.symmetric, in_axes=in_axes, batch_axes=batch_axes,
                            clip_ratio=ratios.get(path))
  return qparams.quantize_params(scaled, spec, quantize)


def _chunks(x, chunk_rows):
  return [x[i:i + chunk_rows] for i in range(0, x.shape[0], chunk_rows)]


def _matrix(w, name):
  """A layer's weight as the `[I, O]` matrix it multiplies with (o: `[H*Dh, D]`)."""
  w = np.asarray(w, np.float32)
  in_axes = 2 if name == "attn/o" else 1
  return w.reshape(int(np.prod(w.shape[:in_axes])), -1)


# MoE blocks: the attention weights as above, and per expert e (calibrated on its own tokens)
# gate/up on the router's input and down on the expert's hidden; shared experts on every token.
MOE_NAMES = ("attn/q", "attn/k", "attn/v", "attn/o", "moe/gate", "moe/up", "moe/down",
             "moe/shared/gate", "moe/shared/up", "moe/shared/down")


def _names(stack: str, lp, spec) -> list[str]:
  """The weights of one block (`stack/name` paths) the spec quantizes."""
  names = INPUT_OF if stack == "blocks" else MOE_NAMES
  present = set(qparams.flatten(lp))
  return [n for n in names if n in present and spec.wants(f"{stack}/{n}")]


def _get(tree, name):
  for key in name.split("/"):
    tree = tree[key]
  return tree


def _set(tree, name, value):
  *parents, last = name.split("/")
  for key in parents:
    tree = tree[key]
  tree[last] = value


def _hessians(name: str, inputs: list, n_experts: int = 0) -> list[np.ndarray]:
  """GPTQ Hessians of weight `name` (one per expert for expert weights) from the calibration
  chunks' `calibrate.Inputs`; an expert no token reached gets the identity (plain rounding)."""
  def total(parts):
    x = np.concatenate([np.asarray(p, np.float32) for p in parts])
    return gptq.hessian(x)
  if name.startswith("moe/shared/"):
    return [total([i.gate_up if name != "moe/shared/down" else i.shared_down for i in inputs])]
  if not name.startswith("moe/"):
    return [total([getattr(i, INPUT_OF[name]) for i in inputs])]
  ids = np.concatenate([np.asarray(i.expert_ids) for i in inputs])  # [N, k]
  if name == "moe/down":
    slots = np.concatenate([np.asarray(i.down, np.float32) for i in inputs])  # [N, k, F]
  else:
    x = np.concatenate([np.asarray(i.gate_up, np.float32) for i in inputs])  # [N, D]
  out = []
  for e in range(n_experts):
    mine = ids == e
    rows = slots[mine] if name == "moe/down" else x[mine.any(axis=1)]
    out.append(gptq.hessian(rows) if len(rows) else np.eye(rows.shape[1]))
  return out


# Weights that multiply the same input share its Hessians.
_SAME_INPUT = {"attn/k": "attn/q", "attn/v": "attn/q", "mlp/up": "mlp/gate",
               "moe/up": "moe/gate", "moe/shared/up": "moe/shared/gate"}


def map_matrices(lp, names, inputs, fn) -> dict:
  """{name: fn(matrix `[I, O]`, its Hessian `[I, I]`, the weight's shape, in_axes)} for one
  layer's weights, expert weights one expert at a time (results stacked to `[E, ...]`)."""
  out, hessians = {}, {}
  for name in names:
    w = _get(lp, name)
    per_expert = name in ("moe/gate", "moe/up", "moe/down")
    in_axes = 2 if name == "attn/o" else 1
    results = []
    key = _SAME_INPUT.get(name, name)
    if key not in hessians:
      hessians[key] = _hessians(name, inputs, w.shape[0] if per_expert else 0)
    for e, h in enumerate(hessians[key]):
      w_e = np.asarray(w[e] if per_expert else w, np.float32)
      m = w_e.reshape(int(np.prod(w_e.shape[:in_axes])), -1)
      results.append(fn(m, h, tuple(w_e.shape), in_axes))
    out[name] = (jax.tree.map(lambda *a: jnp.stack(a), *results) if per_expert
                 else results[0])
  return out


def _layer_gptq(lp, names, inputs, spec, *, act_order, damp):
  """{name: QTensor} for one layer's weights (expert weights `[E, ...]`)."""
  def quantize(m, h, shape, in_axes):
    q, sc, z = gptq.gptq_quantize(m, h, bits=spec.bits, group_size=spec.group_size,
                                  symmetric=spec.symmetric, damp=damp, act_order=act_order,
                                  clip_search=spec.clip_search)
    g = qtensor.group_size_for(q.shape[0], spec.group_size)
    return qtensor.from_integers(q, sc, z, bits=spec.bits, group_size=g, shape=shape,
                                 in_axes=in_axes)
  return map_matrices(lp, names, inputs, quantize)


def walk_layers(graphdef, params, rows, names_of, transform, *, chunk_rows: int,
                progress: bool, desc: str) -> tuple[dict, tuple[str, ...]]:
  """Walks the blocks in depth order, each layer's weights replaced by
  `transform(lp, names, inputs)` -> {name: new weight}, where `inputs` are the layer's
  `calibrate.Inputs` as the already transformed layers before it produce them, and `names` are
  `names_of(stack, lp)`; the transformed layer produces the next layer's inputs.
  -> (params with the new weights stacked, the `stack/name` paths replaced)."""
  xs = [calibrate.embed(graphdef, params, c) for c in _chunks(rows, chunk_rows)]
  order = calibrate.layer_order(graphdef, params)
  graphdefs = {stack: calibrate.block_graphdef(graphdef, params, stack)
               for stack in {stack for stack, _, _ in order}}
  per_layer: dict[str, dict[int, object]] = {}
  for stack, j, depth in tqdm(order, desc=desc, unit="layer", disable=not progress,
                             file=sys.stderr):
    lp = calibrate.layer_params(params[stack], j)
    outs = [calibrate.run_block(graphdefs[stack], lp, x, depth) for x in xs]
    new = transform(lp, names_of(stack, lp), [i for _, i in outs])
    lq = jax.tree.map(lambda a: a, lp)
    for name, value in new.items():
      _set(lq, name, value)
      per_layer.setdefault(f"{stack}/{name}", {})[j] = value
    xs = [calibrate.run_block(graphdefs[stack], lq, x, depth)[0] for x in xs]
  flat = qparams.flatten(params)
  for path, layers in per_layer.items():
    flat[path] = jax.tree.map(lambda *a: jnp.stack(a), *[layers[j] for j in sorted(layers)])
  return qparams.unflatten(flat), tuple(sorted(per_layer))


def _gptq(graphdef, params, spec, rows, *, act_order, damp, chunk_rows, progress):
  """GPTQ through `walk_layers`: each layer's Hessians come from its inputs as the
  already-quantized layers before it produce them."""
  out, done_paths = walk_layers(
      graphdef, params, rows, lambda stack, lp: _names(stack, lp, spec),
      lambda lp, names, inputs: _layer_gptq(lp, names, inputs, spec, act_order=act_order,
                                            damp=damp),
      chunk_rows=chunk_rows, progress=progress, desc="gptq")
  rest = dataclasses.replace(spec, exclude=spec.exclude + tuple(f"^{p}$" for p in done_paths))
  try:  # weights outside the blocks (an untied head, when not excluded) are rounded to nearest
    out, rest_spec = qparams.quantize_params(out, dataclasses.replace(rest, method="rtn"))
    done_paths += rest_spec.quantized
  except ValueError:
    pass
  return out, dataclasses.replace(spec, quantized=done_paths)


AWQ_GRID = 20


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _awq_error(x, w, ref, s, bits, group_size, symmetric):
  """Mean squared output error of x @ Q(w · s) / s against ref = x @ w."""
  q = qtensor.quantize(w * s[:, None], bits=bits, group_size=group_size, symmetric=symmetric)
  out = x @ (q.dequantize() / s[:, None])
  return jnp.mean((out - ref) ** 2)


def _awq_scales(mean_abs_x, ratio):
  s = jnp.maximum(mean_abs_x, 1e-4) ** ratio
  return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


def _awq_search(x_NI, w_IO, bits, group_size, symmetric, parts=None):
  """-> the per-input-channel scale `[I]` s = mean|x|^a minimising the output error of the
  rounded weights, and its ratio a (0 is plain round-to-nearest, so the search never does worse
  than it). `parts` [(x_p, w_p)] (default [(x, w)]): weights that share the input channels but
  see different tokens (experts on their routed tokens); their errors add, weighted by tokens."""
  parts = [(x_NI, w_IO)] if parts is None else parts
  parts = [(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)) for x, w in parts
           if len(x)]
  refs = [x @ w for x, w in parts]
  mean_abs = jnp.mean(jnp.abs(jnp.asarray(x_NI, jnp.float32)), axis=0)
  best = None
  for i in range(AWQ_GRID):
    s = _awq_scales(mean_abs, jnp.float32(i / AWQ_GRID))
    err = sum(float(_awq_error(x, w, ref, s, bits, group_size, symmetric)) * len(x)
              for (x, w), ref in zip(parts, refs))
    if best is None or err < best[0]:
      best = (err, np.asarray(s), i / AWQ_GRID)
  return best[1], best[2]


AWQ_CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _awq_clip_errors(x_NI, w_IO, ratio, bits, group_size, symmetric):
  """`[G, O]` mean squared output error of each group's slice of x @ w when the group's range
  is shrunk by `ratio`."""
  q = qtensor.quantize(w_IO, bits=bits, group_size=group_size, symmetric=symmetric,
                       clip_ratio=jnp.full((1, 1), ratio))
  I, O = w_IO.shape
  G, g = q.num_groups, q.group_size
  pad = G * g - I
  diff = jnp.pad(w_IO - q.dequantize(), ((0, pad), (0, 0))).reshape(G, g, O)
  x = jnp.pad(x_NI, ((0, 0), (0, pad))).reshape(-1, G, g)
  return jnp.mean(jnp.einsum("ngk,gko->ngo", x, diff) ** 2, axis=0)


def _awq_clip(x_NI, w_IO, bits, group_size, symmetric):
  """AWQ's clipping: per group and output column, the range shrink (of AWQ_CLIP_GRID) whose
  rounding least disturbs that group's contribution to the output on calibration inputs."""
  x, w = jnp.asarray(x_NI, jnp.float32), jnp.asarray(w_IO, jnp.float32)
  best_err, best = None, None
  for ratio in AWQ_CLIP_GRID:
    err = _awq_clip_errors(x, w, jnp.float32(ratio), bits, group_size, symmetric)
    if best_err is None:
      best_err, best = err, jnp.full(err.shape, ratio)
    else:
      better = err < best_err
      best_err, best = jnp.where(better, err, best_err), jnp.where(better, ratio, best)
  return np.asarray(best)


def _sample(a, n, rng):
  return a if len(a) <= n else a[rng.choice(len(a), n, replace=False)]


def _awq_dense_groups(lp, stack, K, H):
  """(input key, weights reading it) of the groups whose input scale can be folded into the op
  that produces it: a post-norm block (OLMo 2) feeds q/k/v and gate/up the raw residual
  stream, which nothing can absorb, so those keep scale 1 (plain round-to-nearest)."""
  groups = [("qkv", ["attn/q", "attn/k", "attn/v"])] if "attn_norm" in lp else []
  if H == K:
    groups.append(("o", ["attn/o"]))
  if stack == "blocks":
    if "mlp_norm" in lp:
      groups.append(("gate_up", ["mlp/gate", "mlp/up"]))
    groups.append(("down", ["mlp/down"]))
  elif "shared" in lp["moe"]:
    groups += [("shared_down", ["moe/shared/down"])]
  return groups


def _divide_norm(scale, s, offset):
  """A norm scaling by (offset + w) made to scale by (offset + w) / s, in place."""
  scale[...] = (offset + scale) / s - offset


def _fold(lp, key, s, K, offset=0.0):
  """Divides the op producing group `key`'s input by s (the product stays the same); norm
  scales are (offset + w) (`cfg.norm_offset`)."""
  if key == "qkv":
    _divide_norm(lp["attn_norm"]["scale"], s, offset)
  elif key == "gate_up" and "mlp" in lp:
    _divide_norm(lp["mlp_norm"]["scale"], s, offset)
  elif key == "gate_up":  # MoE: the router and the shared gate read the same input: rows * s
    _divide_norm(lp["mlp_norm"]["scale"], s, offset)
    for name in ("router", "shared_gate"):
      if name in lp["moe"]:
        lp["moe"][name][...] *= s[:, None]
  elif key == "down":
    lp["mlp"]["up"][...] /= s[None, :]
  elif key == "shared_down":
    lp["moe"]["shared"]["up"][...] /= s[None, :]
  else:  # o's input channel (h, dh) is v's output channel (h, dh) when H == K
    lp["attn"]["v"][...] /= s.reshape(1, K, -1)
    if "v_bias" in lp["attn"]:
      lp["attn"]["v_bias"][...] /= s.reshape(K, -1)


def _awq_scale(graphdef, params, spec, rows, *, chunk_rows, progress, sample_tokens=4096,
               clip_tokens=1024):
  """(params with AWQ's scales folded in, still float; per-path clip ratios `[L, (E,) G, O]`).

  MoE layers: one gate/up scale shared by all experts (their input is the router's, divided
  once in the norm; the router's rows absorb it), chosen by the experts' errors on their own
  routed tokens; a down scale per expert from its own hidden, folded into its up columns; clip
  ratios per expert on its tokens."""
  stacks = {k: jax.tree.map(np.array, params[k]) for k in ("blocks", "moe_blocks") if k in params}
  order = calibrate.layer_order(graphdef, params)
  offset = calibrate.model_config(graphdef, params).norm_offset
  graphdefs = {k: calibrate.block_graphdef(graphdef, params, k) for k in stacks}
  any_attn = next(iter(stacks.values()))["attn"]
  H, K = any_attn["q"].shape[2], any_attn["k"].shape[2]
  xs = [calibrate.embed(graphdef, params, c) for c in _chunks(rows, chunk_rows)]
  rng = np.random.default_rng(0)
  ratios: dict[str, dict[str, list]] = {}
  clip = lambda x, w: _awq_clip(x[:clip_tokens], w, spec.bits, spec.group_size, spec.symmetric)
  for stack, j, depth in tqdm(order, desc="awq", unit="layer", disable=not progress,
                             file=sys.stderr):
    lp = jax.tree.map(lambda a: a[j], stacks[stack])  # views: edits land in `stacks`
    outs, inputs = [], []
    for x in xs:
      out, i = calibrate.run_block(graphdefs[stack], lp, x, depth)
      outs.append(out)
      inputs.append(i)
    cat = lambda key: np.concatenate([np.asarray(getattr(i, key), np.float32) for i in inputs])
    sample = {k: _sample(cat(k), sample_tokens, rng) for k in ("qkv", "o", "gate_up")}
    if stack == "blocks":
      sample["down"] = _sample(cat("down"), sample_tokens, rng)
    elif inputs[0].shared_down is not None:
      sample["shared_down"] = _sample(cat("shared_down"), sample_tokens, rng)
    record = lambda n, r: ratios.setdefault(f"{stack}/{n}", {}).setdefault(j, r)
    for key, group in _awq_dense_groups(lp, stack, K, H):
      names = [n for n in group if spec.wants(f"{stack}/{n}")]
      if not names:
        continue
      w = np.concatenate([_matrix(_get(lp, n), n) for n in names], 1)
      s, _ = _awq_search(sample[key], w, spec.bits, spec.group_size, spec.symmetric)
      for n in group:  # every reader's rows (inputs) times s; the quantized ones clipped
        w_n = _get(lp, n)
        w_n[...] = (w_n.reshape(s.shape[0], -1) * s[:, None]).reshape(w_n.shape)
        if n in names:
          record(n, clip(sample[key] / s[None, :], _matrix(w_n, n)))
      _fold(lp, key, s, K, offset)
    if stack == "moe_blocks":
      _awq_experts(lp, inputs, spec, rng, sample_tokens, record, clip, offset)
    xs = outs  # the scaled layer computes the same function: its float outputs feed the next
  out = dict(params)
  for k, stacked in stacks.items():
    out[k] = jax.tree.map(jnp.asarray, stacked)
  return out, {path: jnp.asarray(np.stack([r[j] for j in sorted(r)]))
               for path, r in ratios.items()}


def _awq_experts(lp, inputs, spec, rng, sample_tokens, record, clip, offset=0.0):
  """AWQ for one MoE layer's experts (see `_awq_scale`); edits `lp` in place."""
  moe = lp["moe"]
  E = moe["gate"].shape[0]
  x = np.concatenate([np.asarray(i.gate_up, np.float32) for i in inputs])
  ids = np.concatenate([np.asarray(i.expert_ids) for i in inputs])
  hidden = np.concatenate([np.asarray(i.down, np.float32) for i in inputs])
  tokens = [_sample(x[(ids == e).any(axis=1)], sample_tokens, rng) for e in range(E)]
  slots = [_sample(hidden[ids == e], sample_tokens, rng) for e in range(E)]
  gate_up = [n for n in ("gate", "up") if spec.wants(f"moe_blocks/moe/{n}")]
  if gate_up and "mlp_norm" in lp:  # see _awq_dense_groups
    parts = [(tokens[e], np.concatenate([moe[n][e] for n in gate_up], 1)) for e in range(E)]
    if "shared" in moe:  # the shared experts see every token
      parts.append((_sample(x, sample_tokens, rng),
                    np.concatenate([moe["shared"][n] for n in gate_up], 1)))
    s, _ = _awq_search(_sample(x, sample_tokens, rng), None, spec.bits, spec.group_size,
                       spec.symmetric, parts=parts)
    for n in ("gate", "up"):  # every reader of the normed input absorbs s
      moe[n][...] *= s[None, :, None]
      if "shared" in moe:
        moe["shared"][n][...] *= s[:, None]
    _fold(lp, "gate_up", s, None, offset)
    for n in gate_up:
      record(f"moe/{n}", np.stack([clip(tokens[e] / s[None, :], moe[n][e]) if len(tokens[e])
                                   else _no_clip(moe[n][e], spec) for e in range(E)]))
      if "shared" in moe and spec.wants(f"moe_blocks/moe/shared/{n}"):
        record(f"moe/shared/{n}", clip(_sample(x, sample_tokens, rng) / s[None, :],
                                       moe["shared"][n]))
  if spec.wants("moe_blocks/moe/down"):
    clips = []
    for e in range(E):
      if not len(slots[e]):  # no token reached this expert: plain rounding
        clips.append(_no_clip(moe["down"][e], spec))
        continue
      s, _ = _awq_search(slots[e], moe["down"][e], spec.bits, spec.group_size, spec.symmetric)
      moe["down"][e] *= s[:, None]
      moe["up"][e] /= s[None, :]
      clips.append(clip(slots[e] / s[None, :], moe["down"][e]))
    record("moe/down", np.stack(clips))


def _no_clip(w_IO, spec):
  """Clip ratios of 1 (the full range) in the shape `_awq_clip` gives."""
  G = -(-w_IO.shape[0] // qtensor.group_size_for(w_IO.shape[0], spec.group_size))
  return np.ones((G, w_IO.shape[1]), np.float32)
