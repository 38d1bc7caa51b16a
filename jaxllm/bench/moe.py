"""`jaxllm.bench moe`: the MoE layer's dispatch modes, the grouped-matmul kernel and an
expert-parallel train step, each against its peers in the same run.

  layer  tokens/s of one MoE layer (router, dispatch, SwiGLU experts, combine), forward and
         forward+backward, for
           dropless_ragged  tokens sorted by expert, `jax.lax.ragged_dot` grouped matmuls
           dropless_tiled   the same through row tiles and batched matmuls (`ops.moe`'s CPU path)
           dropless_pallas  the same through our grouped-matmul kernel (GPU)
           capacity         GShard dispatch into [E, C, D] buffers, capacity factor 1.25
           dense_loop       every expert on every token, outputs weighted by the routing
                            (zero for unchosen experts): E / k times the useful FLOPs
  gmm    our grouped-matmul kernel vs `jax.lax.ragged_dot` (GPU): TFLOP/s of the forward and of
         forward+backward (3x the FLOPs) at balanced random group sizes, beside a dense bf16
         matmul with the same FLOPs (the ceiling)
  ep     step time of the MoE train step (experiments/tiny_moe.py shapes) on every local
         device: experts split over `mesh.expert` (all-to-all) vs experts replicated with the
         batch over `mesh.data`; needs several devices (on CPU the bench forces 8)
Times are medians of `repeats` jitted calls after a warm-up. On CPU the Pallas kernel runs only
interpreted, so it is left out there.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.bench import timing
from jaxllm.model import moe
from jaxllm.ops import moe as moe_ops

LAYER_PEERS = ("dropless_ragged", "dropless_tiled", "dropless_pallas", "capacity", "dense_loop")
_IMPL = {"dropless_ragged": "xla", "dropless_tiled": "tiled", "dropless_pallas": "pallas"}


def _dense_loop(x_ND, r: moe.Routing, ex: moe.Experts) -> jax.Array:
  dt = x_ND.dtype
  gate = jnp.einsum("nd,edf->enf", x_ND, ex.gate.astype(dt), preferred_element_type=jnp.float32)
  up = jnp.einsum("nd,edf->enf", x_ND, ex.up.astype(dt), preferred_element_type=jnp.float32)
  y = jnp.einsum("enf,efd->end", (jax.nn.silu(gate) * up).astype(dt), ex.down.astype(dt),
                 preferred_element_type=jnp.float32)
  E = ex.gate.shape[0]
  weight_NE = jnp.sum(jax.nn.one_hot(r.ids, E) * r.weights[..., None], axis=1)
  return jnp.einsum("end,ne->nd", y, weight_NE).astype(dt)


def _layer_fn(peer: str, k: int):
  def fn(x_ND, router_DE, ex):
    r = moe.route(x_ND.astype(jnp.float32) @ router_DE, k)
    if peer == "dense_loop":
      return _dense_loop(x_ND, r, ex)
    if peer == "capacity":
      slots, _ = moe.with_capacity(x_ND, r.ids, ex, factor=1.25, n_experts=ex.gate.shape[0])
    else:
      slots = moe.dropless(x_ND, r.ids, ex, impl=_IMPL[peer])
    return jnp.einsum("nkd,nk->nd", slots, r.weights).astype(x_ND.dtype)
  return fn


def layer_rows(shapes, *, repeats: int, dtype=jnp.bfloat16, peers=LAYER_PEERS) -> list[dict]:
  """shapes: (tokens N, d_model D, expert width F, experts E, top-k k)."""
  gpu = jax.default_backend() == "gpu"
  rows = []
  for N, D, F, E, k in shapes:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, D)), dtype)
    router = jnp.asarray(rng.standard_normal((D, E)) * D ** -0.5, jnp.float32)
    ex = moe.Experts(*(jnp.asarray(rng.standard_normal(s) * 0.02, dtype)
                       for s in ((E, D, F), (E, D, F), (E, F, D))))
    row = {"tokens": N, "d_model": D, "d_ff": F, "experts": E, "k": k,
           "useful_gflop": 6.0 * N * k * D * F / 1e9}
    for peer in peers:
      if peer == "dropless_pallas" and not gpu:
        continue
      fn = _layer_fn(peer, k)
      fwd_bwd = jax.grad(lambda x, r, e: jnp.sum(fn(x, r, e).astype(jnp.float32)),
                         argnums=(0, 1, 2))
      for mode, f in (("fwd", fn), ("fwd_bwd", fwd_bwd)):
        try:
          seconds = timing.median_seconds(jax.jit(f), (x, router, ex), repeats)
          row[f"{peer}_{mode}_tokens_per_s"] = N / seconds
        except Exception as e:  # noqa: BLE001 - a peer that cannot run here is noted, not fatal
          row[f"{peer}_{mode}_tokens_per_s"] = None
          row.setdefault("errors", {})[f"{peer}_{mode}"] = f"{type(e).__name__}: {e}"[:200]
    for mode in ("fwd", "fwd_bwd"):
      base = row.get(f"dense_loop_{mode}_tokens_per_s")
      for peer in LAYER_PEERS[:-1]:
        ours = row.get(f"{peer}_{mode}_tokens_per_s")
        row[f"{peer}_vs_dense_loop_{mode}"] = ours / base if ours and base else None
    rows.append(row)
  return rows


def gmm_rows(shapes, *, repeats: int) -> list[dict]:
  """shapes: (rows M, K, N, groups E); group sizes balanced random, bf16."""
  rows = []
  for M, K, N, E in shapes:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((E, K, N)) * 0.02, jnp.bfloat16)
    split = np.sort(rng.choice(np.arange(1, M), E - 1, replace=False))
    sizes = jnp.asarray(np.diff(np.concatenate([[0], split, [M]])), jnp.int32)
    dy = jnp.asarray(rng.standard_normal((M, N)), jnp.bfloat16)
    flops = 2.0 * M * K * N
    row = {"M": M, "K": K, "N": N, "groups": E}
    dense_w = jnp.asarray(rng.standard_normal((K, N)) * 0.02, jnp.bfloat16)
    row["dense_fwd_tflops"] = flops / timing.median_seconds(jax.jit(jnp.dot), (x, dense_w),
                                                       repeats) / 1e12
    for impl in ("pallas", "xla", "tiled"):
      fwd = lambda x, w, g, impl=impl: moe_ops.grouped_matmul(x, w, g, impl=impl)

      def fwd_bwd(x, w, g, dy, fwd=fwd):
        _, vjp = jax.vjp(lambda x, w: fwd(x, w, g), x, w)
        return vjp(dy)
      try:
        row[f"{impl}_fwd_tflops"] = flops / timing.median_seconds(jax.jit(fwd), (x, w, sizes),
                                                            repeats) / 1e12
        row[f"{impl}_fwd_bwd_tflops"] = 3 * flops / timing.median_seconds(
            jax.jit(fwd_bwd), (x, w, sizes, dy), repeats) / 1e12
      except Exception as e:  # noqa: BLE001 - a peer that cannot run here is noted, not fatal
        row.setdefault("errors", {})[impl] = f"{type(e).__name__}: {e}"[:200]
    for mode in ("fwd", "fwd_bwd"):
      ours, theirs = row.get(f"pallas_{mode}_tflops"), row.get(f"xla_{mode}_tflops")
      row[f"pallas_vs_ragged_dot_{mode}"] = ours / theirs if ours and theirs else None
    rows.append(row)
  return rows


def ep_rows(*, repeats: int) -> list[dict]:
  """The tiny MoE experiment's train step on all local devices, experts sharded vs not."""
  from experiments import tiny_moe
  from jaxllm import config as config_lib
  from jaxllm.parallel import mesh as mesh_lib
  from jaxllm.parallel import rules
  from jaxllm.train import loop, step as step_lib
  n = jax.device_count()
  if n < 2:
    return []
  base = tiny_moe.get_config()
  E = base.model.n_experts
  ep = max(d for d in range(1, n + 1) if n % d == 0 and E % d == 0)
  rows = []
  for name, mesh_axes in (("experts_sharded", dict(data=n // ep, expert=ep)),
                          ("experts_replicated", dict(data=n))):
    c = base.copy_and_resolve_references()
    c.mesh.update({**dict(data=1, fsdp=1, tensor=1, stage=1, expert=1), **mesh_axes})
    c.train.batch_size = max(c.train.batch_size // n, 1) * n
    cfg = config_lib.from_config_dict(c)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    graphdef, _, shardings, optimizer = loop.state_shardings(cfg, mesh)
    state = loop.initial_state(cfg, optimizer, shardings)
    batch_sh = rules.batch_sharding(mesh)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    tokens = np.random.default_rng(0).integers(0, V, (B, T + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": np.ones((B, T), np.float32), "segment_ids": np.ones((B, T), np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
    batch = {k: jax.device_put(v, batch_sh) for k, v in batch.items()}
    step = mesh_lib.under_mesh(jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train),
                                       in_shardings=(shardings, batch_sh),
                                       out_shardings=(shardings, None)), mesh)
    seconds = timing.median_seconds(lambda s, b: step(s, b)[1]["loss"], (state, batch), repeats)
    rows.append({"layout": name, "mesh": mesh_axes, "batch": B, "seq_len": T,
                 "step_ms": seconds * 1e3, "tokens_per_s": B * T / seconds})
  return rows


def run(layer_shapes, gmm_shapes, *, repeats: int = 5, ep: bool = True) -> dict:
  gpu = jax.default_backend() == "gpu"
  device = jax.devices()[0]
  return {"suite": "moe", "backend": jax.default_backend(), "device_kind": device.device_kind,
          "devices": jax.device_count(), "jax": jax.__version__,
          "date": time.strftime("%Y-%m-%d"),
          "layer": layer_rows(layer_shapes, repeats=repeats),
          "gmm": gmm_rows(gmm_shapes, repeats=repeats) if gpu else [],
          "ep": ep_rows(repeats=repeats) if ep else []}


def table(result: dict) -> str:
  fmt = lambda x, spec=".3g": "-" if x is None else format(x, spec)
  lines = [f"moe: {result['device_kind']} x{result['devices']} ({result['backend']}, jax "
           f"{result['jax']}, {result['date']})", "",
           "MoE layer, tokens/s (bf16; ratios against the dense loop over experts)"]
  cols = ["N", "D", "F", "E", "k", "mode", *LAYER_PEERS,
          *(f"{p.split('_')[-1]}/loop" for p in LAYER_PEERS[:-1])]
  lines.append("  ".join(f"{c:>15}" for c in cols))
  for r in result["layer"]:
    for mode in ("fwd", "fwd_bwd"):
      cells = [r["tokens"], r["d_model"], r["d_ff"], r["experts"], r["k"], mode,
               *(fmt(r.get(f"{p}_{mode}_tokens_per_s")) for p in LAYER_PEERS),
               *(fmt(r.get(f"{p}_vs_dense_loop_{mode}"), ".2f") for p in LAYER_PEERS[:-1])]
      lines.append("  ".join(f"{c!s:>15}" for c in cells))
  if result["gmm"]:
    lines += ["", "grouped matmul, TFLOP/s (bf16): our kernel vs jax.lax.ragged_dot; dense "
              "matmul of the same FLOPs as the ceiling"]
    cols = ["M", "K", "N", "E", "pallas fwd", "ragged fwd", "tiled fwd", "ratio", "pallas f+b",
            "ragged f+b", "tiled f+b", "ratio", "dense fwd"]
    lines.append("  ".join(f"{c:>11}" for c in cols))
    for r in result["gmm"]:
      cells = [r["M"], r["K"], r["N"], r["groups"], fmt(r.get("pallas_fwd_tflops")),
               fmt(r.get("xla_fwd_tflops")), fmt(r.get("tiled_fwd_tflops")),
               fmt(r.get("pallas_vs_ragged_dot_fwd"), ".2f"),
               fmt(r.get("pallas_fwd_bwd_tflops")), fmt(r.get("xla_fwd_bwd_tflops")),
               fmt(r.get("tiled_fwd_bwd_tflops")),
               fmt(r.get("pallas_vs_ragged_dot_fwd_bwd"), ".2f"), fmt(r.get("dense_fwd_tflops"))]
      lines.append("  ".join(f"{c!s:>11}" for c in cells))
  if result["ep"]:
    lines += ["", "MoE train step (experiments/tiny_moe.py shapes) on all devices"]
    for r in result["ep"]:
      lines.append(f"  {r['layout']:>20}  mesh {r['mesh']}  {r['step_ms']:.1f} ms/step  "
                   f"{r['tokens_per_s']:.0f} tokens/s")
  return "\n".join(lines)
