"""`jaxllm.bench train`: step time, tokens/s and MFU of the configured train step.

MFU is reported against the device's data-sheet peak where one is known (GPU/TPU), and always
against a peer measured in the same run: a large dense matmul in the model's compute dtype on
the same devices ("matmul-relative MFU"), which is what the CPU has instead of a data sheet.
"""

from __future__ import annotations

import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config as config_lib
from jaxllm.bench import flops
from jaxllm.parallel import mesh as mesh_lib
from jaxllm.parallel import rules
from jaxllm.train import loop, step as step_lib


def _time(fn, repeats: int) -> list[float]:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def matmul_peak_flops(dtype: str, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n x n x n matmul on the default device (the same-run peer)."""
  a = jnp.ones((n, n), jnp.dtype(dtype))
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  return 2.0 * n ** 3 / statistics.median(_time(lambda: f(a), repeats))


def synthetic_batch(cfg: config_lib.Config, sharding) -> dict[str, jax.Array]:
  """A `[batch_size, seq_len]` batch of random tokens (one document per row) on `sharding`."""
  B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
  tokens = np.random.default_rng(0).integers(0, V, size=(B, T + 1)).astype(np.int32)
  host_batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "weights": np.ones((B, T), np.float32), "segment_ids": np.ones((B, T), np.int32),
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}
  return {k: jax.device_put(v, sharding) for k, v in host_batch.items()}


def run(cfg: config_lib.Config, steps: int = 10, warmup: int = 2) -> dict:
  config_lib.validate_for_devices(cfg, jax.device_count(), jax.default_backend())
  mesh = mesh_lib.make_mesh(cfg.mesh)
  graphdef, _, shardings, optimizer = loop.state_shardings(cfg, mesh)
  state = loop.initial_state(cfg, optimizer, shardings)
  batch_sh = rules.batch_sharding(mesh)
  B, T = cfg.train.batch_size, cfg.train.seq_len
  batch = synthetic_batch(cfg, batch_sh)
  train_step = jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train),
                       in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                       donate_argnums=0)
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  usage = resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  after = resource.getrusage(resource.RUSAGE_SELF)
  step_s = statistics.median(times)
  tokens_per_s = B * T / step_s
  model_flops = flops.train_flops_per_token(cfg.model, T) * tokens_per_s
  n_dev = jax.device_count()
  peer = matmul_peak_flops(cfg.model.dtype) * n_dev
  kind = jax.devices()[0].device_kind
  peak_tflops = flops.device_peak_tflops(kind)
  result = {
      "suite": "train", "config": cfg.name, "backend": jax.default_backend(),
      "device_kind": kind, "devices": n_dev, "jax": jax.__version__,
      "batch_size": B, "seq_len": T, "dtype": cfg.model.dtype,
      "matmul_params": flops.matmul_params(cfg.model),
      "compile_s": compile_s, "step_s": step_s, "step_s_min": min(times),
      "tokens_per_s": tokens_per_s,
      # The whole process per step: minor page faults and kernel CPU time (on XLA:CPU, the
      # cost of fresh temporaries; see jaxllm.cli.host_allocator).
      "page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps,
      "kernel_s_per_step": (after.ru_stime - usage.ru_stime) / steps, "model_tflops_per_s": model_flops / 1e12,
      "matmul_peer_tflops_per_s": peer / 1e12, "mfu_vs_matmul_peer": model_flops / peer,
      "mfu_vs_datasheet": (model_flops / (peak_tflops * 1e12 * n_dev)) if peak_tflops else None,
  }
  return result


def table(result: dict) -> str:
  rows = [
      ("config", f"{result['config']} ({result['dtype']}, batch {result['batch_size']} x "
                 f"{result['seq_len']})"),
      ("device", f"{result['devices']} x {result['device_kind']} ({result['backend']}, "
                 f"jax {result['jax']})"),
      ("compile", f"{result['compile_s']:.2f} s"),
      ("step time", f"{result['step_s'] * 1e3:.1f} ms (median; min {result['step_s_min'] * 1e3:.1f})"),
      ("tokens/s", f"{result['tokens_per_s']:,.0f}"),
      ("page faults/step", f"{result['page_faults_per_step']:,.0f} (kernel "
                           f"{result['kernel_s_per_step'] * 1e3:.0f} ms/step)"),
      ("model TFLOP/s", f"{result['model_tflops_per_s']:.4f}"),
      ("matmul peer TFLOP/s", f"{result['matmul_peer_tflops_per_s']:.4f}"),
      ("MFU vs matmul peer", f"{result['mfu_vs_matmul_peer']:.1%}"),
      ("MFU vs data sheet", "n/a (no data-sheet peak for this device)"
       if result["mfu_vs_datasheet"] is None else f"{result['mfu_vs_datasheet']:.1%}"),
  ]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
