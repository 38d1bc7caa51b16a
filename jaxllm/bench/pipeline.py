"""`jaxllm.bench pipeline`: the GPipe bubble, measured.

For each stage count p, the forward+backward of the configured model runs as a p-stage pipeline
with m = 1, 2, 4, 8 microbatches of a fixed size, so each tick costs the same time tau and a
step takes (m + p - 1) ticks. A least-squares line t(m) = tau * m + overhead gives tau; the
measured bubble is 1 - m * tau / t(m), printed beside the formula (p - 1) / (m + p - 1) and the
fitted overhead in ticks (p - 1 expected). With `--config.train.pipeline_chunks=v` (circular
schedule) a tick is 1/v of a microbatch's trip and the formula is (p - 1) / (m v + p - 1). Needs p devices (on CPU: XLA_FLAGS=
--xla_force_host_platform_device_count=8).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import pipeline
from jaxllm.train import loop, step as step_lib


def _step_seconds(cfg: config_lib.Config, devices, repeats: int) -> float:
  mesh = mesh_lib.make_mesh(cfg.mesh, devices)
  graphdef, _, shardings, optimizer = loop.state_shardings(cfg, mesh)
  params = loop.initial_state(cfg, optimizer, shardings)["params"]
  B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T + 1)), jnp.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "weights": jnp.ones((B, T), jnp.float32), "segment_ids": jnp.ones((B, T), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))}
  grads = jax.jit(jax.grad(lambda p, b: step_lib.batch_loss(graphdef, p, b, cfg.train)[0]))
  fn = mesh_lib.under_mesh(grads, mesh)
  jax.block_until_ready(fn(params, batch))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, batch))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def run(cfg: config_lib.Config, stages=(2, 4), microbatches=(1, 2, 4, 8),
        microbatch_rows: int = 2, repeats: int = 3) -> dict:
  v = cfg.train.pipeline_chunks
  rows = []
  for p in stages:
    if p > jax.device_count() or cfg.model.n_layers % (p * v):
      raise config_lib.ConfigError(f"{p} stages need {p} devices and n_layers divisible by "
                                   f"{p} x train.pipeline_chunks={v}")
    # The circular schedule needs microbatches >= stages.
    ms_here = [m for m in microbatches if v == 1 or m >= p]
    mesh = dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1, stage=p, expert=1)
    times = {}
    for m in ms_here:
      train = dataclasses.replace(cfg.train, batch_size=m * microbatch_rows, grad_accum=1,
                                  microbatches=m)
      times[m] = _step_seconds(dataclasses.replace(cfg, mesh=mesh, train=train),
                               jax.devices()[:p], repeats)
    ms = np.asarray(ms_here, float)
    ts = np.asarray([times[m] for m in ms_here])
    tau, overhead = np.polyfit(ms, ts, 1)  # tau: one microbatch's full trip through the ring
    for m in ms_here:
      rows.append({"stages": p, "microbatches": m, "chunks": v, "step_s": times[m],
                   "measured_bubble": 1.0 - m * tau / times[m],
                   "formula_bubble": pipeline.bubble_fraction(p, m, v),
                   "overhead_ticks": overhead / tau * v})
  return {"suite": "pipeline", "config": cfg.name, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
          "microbatch_rows": microbatch_rows, "rows": rows}


def table(result: dict) -> str:
  chunks = result["rows"][0]["chunks"] if result["rows"] else 1
  schedule = "GPipe" if chunks == 1 else f"circular x{chunks}"
  lines = [f"{schedule} bubble: {result['config']} on {result['device_kind']} "
           f"({result['backend']}, jax {result['jax']}), {result['microbatch_rows']} rows per "
           "microbatch",
           f"{'stages':>6} {'micro':>6} {'step s':>9} {'measured':>9} {'formula':>9} "
           f"{'overhead ticks (fit)':>21}"]
  for r in result["rows"]:
    lines.append(f"{r['stages']:>6} {r['microbatches']:>6} {r['step_s']:>9.4f} "
                 f"{r['measured_bubble']:>9.1%} {r['formula_bubble']:>9.1%} "
                 f"{r['overhead_ticks']:>21.2f}")
  return "\n".join(lines)
