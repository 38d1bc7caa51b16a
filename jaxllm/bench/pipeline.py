"""`jaxllm.bench pipeline`: the pipeline bubble, measured, and each schedule's compiled memory.

For each stage count p, the forward+backward of the configured model runs as a p-stage pipeline
with m = 1, 2, 4, 8 microbatches of a fixed size, so each tick costs the same time tau and a
step takes (m + p - 1) ticks. A least-squares line t(m) = tau * m + overhead gives tau; the
measured bubble is 1 - m * tau / t(m), printed beside the formula (p - 1) / (m + p - 1) and the
fitted overhead in ticks (p - 1 expected). With `--config.train.pipeline_chunks=v` (circular
schedule) a tick is 1/v of a microbatch's trip and the formula is (p - 1) / (m v + p - 1). Needs p
devices (on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8). The simulated CPU devices
share the host's cores, so the bubble shows as time only where idle slots compute on
placeholder data (GPipe, circular); 1F1B's idle slots skip their work, its formula is GPipe's
for stages that run in parallel, and on CPU its fit measures the work it does (its backward
recomputes each stage's forward).

`--pipeline_memory=4,8,16` also compiles the whole train step under GPipe, circular (2 chunks)
and 1F1B at those microbatch counts (fixed rows per microbatch, the largest stage count) and
reports XLA's temporary and peak bytes per device: GPipe's grow with m (every microbatch's
activations wait for the flush), 1F1B's stay nearly flat.
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


def memory(cfg: config_lib.Config, stages: int, microbatches=(4, 8, 16),
           microbatch_rows: int = 2, chunks: int = 2) -> list[dict]:
  """Compiled per-device memory of the whole train step under each schedule (GPipe, circular
  with `chunks` chunks per stage, 1F1B) at m microbatches of `microbatch_rows` rows: XLA's
  temporaries (activations, gradients in flight, scratch) and peak, from `memory_analysis`."""
  from jaxllm.planner import aot
  rows = []
  schedules = [("gpipe", 1), ("circular", chunks), ("1f1b", 1)]
  for schedule, v in schedules:
    if cfg.model.n_layers % (stages * v):
      continue
    for m in microbatches:
      if schedule == "circular" and m < stages:
        continue
      train = dataclasses.replace(cfg.train, batch_size=m * microbatch_rows, grad_accum=1,
                                  microbatches=m, pipeline_chunks=v, pipeline_schedule=schedule)
      mesh = dataclasses.replace(cfg.mesh, data=1, fsdp=1, tensor=1, stage=stages, expert=1)
      run_cfg = dataclasses.replace(cfg, mesh=mesh, train=train)
      config_lib.validate(run_cfg)
      stats = aot.compile_train_step(run_cfg, jax.devices()[:stages])
      rows.append({"schedule": schedule, "chunks": v, "stages": stages, "microbatches": m,
                   "temp_bytes": stats["temp_bytes"], "peak_bytes": stats["peak_bytes"]})
  return rows


def run(cfg: config_lib.Config, stages=(2, 4), microbatches=(1, 2, 4, 8),
        microbatch_rows: int = 2, repeats: int = 3,
        memory_microbatches: tuple[int, ...] = ()) -> dict:
  v = cfg.train.pipeline_chunks
  schedule = config_lib.pipeline_schedule(cfg.train)
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
      rows.append({"stages": p, "microbatches": m, "chunks": v, "schedule": schedule,
                   "step_s": times[m], "measured_bubble": 1.0 - m * tau / times[m],
                   "formula_bubble": pipeline.bubble_fraction(p, m, v),
                   "overhead_ticks": overhead / tau * v})
  result = {"suite": "pipeline", "config": cfg.name, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
            "microbatch_rows": microbatch_rows, "rows": rows, "memory": []}
  if memory_microbatches:
    result["memory"] = memory(cfg, max(stages), memory_microbatches, microbatch_rows)
  return result


def table(result: dict) -> str:
  chunks = result["rows"][0]["chunks"] if result["rows"] else 1
  schedule = result["rows"][0]["schedule"] if result["rows"] else "gpipe"
  schedule = {"gpipe": "GPipe", "1f1b": "1F1B"}.get(schedule, f"circular x{chunks}")
  lines = [f"{schedule} bubble: {result['config']} on {result['device_kind']} "
           f"({result['backend']}, jax {result['jax']}), {result['microbatch_rows']} rows per "
           "microbatch",
           f"{'stages':>6} {'micro':>6} {'step s':>9} {'measured':>9} {'formula':>9} "
           f"{'overhead ticks (fit)':>21}"]
  for r in result["rows"]:
    lines.append(f"{r['stages']:>6} {r['microbatches']:>6} {r['step_s']:>9.4f} "
                 f"{r['measured_bubble']:>9.1%} {r['formula_bubble']:>9.1%} "
                 f"{r['overhead_ticks']:>21.2f}")
  if result.get("memory"):
    lines += ["", "compiled train-step memory per device (XLA memory_analysis), MiB",
              f"{'schedule':>12} {'stages':>6} {'micro':>6} {'temp':>9} {'peak':>9}"]
    for r in result["memory"]:
      name = r["schedule"] + (f" x{r['chunks']}" if r["chunks"] > 1 else "")
      lines.append(f"{name:>12} {r['stages']:>6} {r['microbatches']:>6} "
                   f"{r['temp_bytes'] / 2**20:>9.2f} {r['peak_bytes'] / 2**20:>9.2f}")
  return "\n".join(lines)
