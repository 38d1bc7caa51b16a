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


def _layers_bar(n, desc, progress):
  return tqdm(range(n), desc=desc, unit="layer", disable=not progress, file=sys.stderr)


def _matrix(w, name):
  """A layer's weight as the `[I, O]` matrix it multiplies with (o: `[H*Dh, D]`)."""
  w = np.asarray(w, np.float32)
  in_axes = qparams.LAYOUTS[f"blocks/{name}"][0]
  return w.reshape(int(np.prod(w.shape[:in_axes])), -1)


def _gptq(graphdef, params, spec, rows, *, act_order, damp, chunk_rows, progress):
  stacked = params["blocks"]
  bgd = calibrate.block_graphdef(graphdef, params)
  names = [n for n in INPUT_OF if spec.wants(f"blocks/{n}")]
  xs = [calibrate.embed(graphdef, params, c) for c in _chunks(rows, chunk_rows)]
  L = jax.tree.leaves(stacked)[0].shape[0]
  per_layer: dict[str, list] = {n: [] for n in names}
  for layer in _layers_bar(L, "gptq", progress):
    lp = calibrate.layer_params(stacked, layer)
    sums: dict[str, np.ndarray] = {}
    count = 0
    for x in xs:
      _, inputs = calibrate.run_block(bgd, lp, x)
      count += inputs.qkv.shape[0]
      for key in set(INPUT_OF[n] for n in names):
        a = getattr(inputs, key).astype(jnp.float32)
        sums[key] = sums.get(key, 0.0) + np.asarray(a.T @ a, np.float64)
    quantized = {}
    for name in names:
      h = 2.0 * sums[INPUT_OF[name]] / count
      module, leaf = name.split("/")
      w = lp[module][leaf]
      q, s, z = gptq.gptq_quantize(_matrix(w, name), h, bits=spec.bits,
                                   group_size=spec.group_size, symmetric=spec.symmetric,
                                   damp=damp, act_order=act_order,
                                   clip_search=spec.clip_search)
      g = qtensor.group_size_for(q.shape[0], spec.group_size)
      quantized[name] = qtensor.from_integers(q, s, z, bits=spec.bits, group_size=g,
                                              shape=tuple(w.shape),
                                              in_axes=qparams.LAYOUTS[f"blocks/{name}"][0])
      per_layer[name].append(quantized[name])
    lq = jax.tree.map(lambda a: a, lp)
    for name, qt in quantized.items():
      module, leaf = name.split("/")
      lq[module][leaf] = qt
    xs = [calibrate.run_block(bgd, lq, x)[0] for x in xs]
  flat = qparams.flatten(params)
  for name, layers in per_layer.items():
    flat[f"blocks/{name}"] = jax.tree.map(lambda *a: jnp.stack(a), *layers)
  done = tuple(f"blocks/{n}" for n in names)
  rest = dataclasses.replace(spec, exclude=spec.exclude + tuple(f"^{p}$" for p in done))
  out = qparams.unflatten(flat)
  try:  # weights outside the blocks (an untied head, when not excluded) are rounded to nearest
    out, rest_spec = qparams.quantize_params(out, dataclasses.replace(rest, method="rtn"))
    done += rest_spec.quantized
  except ValueError:
    pass
  return out, dataclasses.replace(spec, quantized=done)


AWQ_GRID = 20


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _awq_loss(x, w, ref, ratio, bits, group_size, symmetric):
  """Output error of Q(w · s) / s for s = mean|x|^ratio (normalised), and s."""
  s = jnp.maximum(jnp.mean(jnp.abs(x), axis=0), 1e-4) ** ratio
  s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
  q = qtensor.quantize(w * s[:, None], bits=bits, group_size=group_size, symmetric=symmetric)
  out = x @ (q.dequantize() / s[:, None])
  return jnp.mean((out - ref) ** 2), s


def _awq_search(x_NI, w_IO, bits, group_size, symmetric):
  """-> the per-input-channel scale `[I]` minimising ||x w - x Q(w s) / s||², and its ratio
  (ratio 0 is plain round-to-nearest, so the search never does worse than it)."""
  x = jnp.asarray(x_NI, jnp.float32)
  w = jnp.asarray(w_IO, jnp.float32)
  ref = x @ w
  best = None
  for i in range(AWQ_GRID):
    err, s = _awq_loss(x, w, ref, jnp.float32(i / AWQ_GRID), bits, group_size, symmetric)
    if best is None or float(err) < best[0]:
      best = (float(err), np.asarray(s), i / AWQ_GRID)
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


def _awq_scale(graphdef, params, spec, rows, *, chunk_rows, progress, sample_tokens=4096,
               clip_tokens=1024):
  """(params with AWQ's scales folded in, still float; per-path clip ratios `[L, G, O]`)."""
  stacked = jax.tree.map(np.array, params["blocks"])  # writable host copies
  bgd = calibrate.block_graphdef(graphdef, params)
  L = stacked["attn"]["q"].shape[0]
  H, K = stacked["attn"]["q"].shape[2], stacked["attn"]["k"].shape[2]
  xs = [calibrate.embed(graphdef, params, c) for c in _chunks(rows, chunk_rows)]
  rng = np.random.default_rng(0)
  ratios: dict[str, list] = {}
  for layer in _layers_bar(L, "awq", progress):
    lp = jax.tree.map(lambda a: a[layer], stacked)  # views: edits land in `stacked`
    outs, gathered = [], {k: [] for k in ("qkv", "o", "gate_up", "down")}
    for x in xs:
      out, inputs = calibrate.run_block(bgd, lp, x)
      outs.append(out)
      for key in gathered:
        gathered[key].append(np.asarray(getattr(inputs, key), np.float32))
    sample = {}
    for key, parts in gathered.items():
      a = np.concatenate(parts)
      sample[key] = a[rng.choice(a.shape[0], min(sample_tokens, a.shape[0]), replace=False)]
    groups = [("qkv", ["attn/q", "attn/k", "attn/v"]), ("gate_up", ["mlp/gate", "mlp/up"]),
              ("down", ["mlp/down"])]
    if H == K:
      groups.append(("o", ["attn/o"]))
    for key, names in groups:
      names = [n for n in names if spec.wants(f"blocks/{n}")]
      if not names:
        continue
      w = np.concatenate([_matrix(lp[n.split("/")[0]][n.split("/")[1]], n) for n in names], 1)
      s, _ = _awq_search(sample[key], w, spec.bits, spec.group_size, spec.symmetric)
      for n in names:  # weight rows (inputs) times s ...
        module, leaf = n.split("/")
        w_n = lp[module][leaf]
        lp[module][leaf][...] = (w_n.reshape(s.shape[0], -1) * s[:, None]).reshape(w_n.shape)
        # ... whose rounding range is then clipped against the inputs it will see (x / s)
        clip_x = sample[key][:clip_tokens] / s[None, :]
        ratios.setdefault(f"blocks/{n}", []).append(
            _awq_clip(clip_x, _matrix(lp[module][leaf], n), spec.bits, spec.group_size,
                      spec.symmetric))
      # ... and the op producing the input divided by s
      if key == "qkv":
        lp["attn_norm"]["scale"][...] /= s
      elif key == "gate_up":
        lp["mlp_norm"]["scale"][...] /= s
      elif key == "down":
        lp["mlp"]["up"][...] /= s[None, :]
      else:  # o's input channel (h, dh) is v's output channel (h, dh) when H == K
        lp["attn"]["v"][...] /= s.reshape(1, K, -1)
    xs = outs  # the scaled layer computes the same function: its float outputs feed the next
  out = dict(params)
  out["blocks"] = jax.tree.map(jnp.asarray, stacked)
  return out, {path: jnp.asarray(np.stack(r)) for path, r in ratios.items()}
