"""Ahead-of-time compilation for TPU topologies (`jaxllm.planner.aot`, `plan --aot`).

The compiling tests need libtpu, which `pip install '.[tpu]'` brings for the installed jax
(CI installs it: jax 0.10.2 + libtpu 0.0.42.1 on python 3.11; jax 0.12.0.1 + libtpu 0.0.51 on
python 3.12 also pass). No TPU is needed: libtpu's compiler runs on abstract devices.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from experiments import tiny
from jaxllm import config as config_lib
from jaxllm.config import ConfigError
from jaxllm.planner import aot, plan
from pallas_kernels import backends

needs_libtpu = pytest.mark.skipif(not backends.libtpu_available(),
                                  reason="needs libtpu (pip install 'jaxllm[tpu]'); CI has it")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_types_name_cloud_tpu_slices():
  t = aot.tpu_target("v5p-64")  # v5p counts TensorCores, two per chip
  assert (t.chips, t.topology_name, t.slices, t.hbm_bytes) == (32, "v5p:2x4x4", 1, 95 * 2**30)
  assert aot.tpu_target("v6e-256").topology_name == "v6e:16x16"
  t = aot.tpu_target("v6e-256", slices=4)
  assert (t.chips, t.topology_name, t.slices) == (256, "v6e:8x8", 4)
  assert aot.tpu_target("v5litepod-16").topology_name == "v5e:4x4"
  assert aot.preset_of("experiments/llama3_8b.py:v5p-64") == "v5p-64"
  assert aot.preset_of("experiments/tiny.py") is None
  for name, slices, match in [("a100-8", 1, "not a TPU"), ("v5p-6", 1, "no v5p slice of 3"),
                              ("v6e-64", 3, "does not split")]:
    with pytest.raises(ConfigError, match=match):
      aot.tpu_target(name, slices)


def _small_tiny(**mesh):
  c = tiny.get_config()
  c.model.update(n_layers=2, max_seq_len=256)
  c.train.update(batch_size=8, seq_len=256)
  c.mesh.update({"data": 1, **mesh})
  return config_lib.from_config_dict(c)


@needs_libtpu
def test_train_step_compiles_for_v5p_with_the_planned_argument_bytes(tmp_path):
  """The tiny model's full train step (FSDP 2 x data 2, our Mosaic flash kernel inside)
  compiles for a 4-chip v5p slice, and the compiler's input bytes per chip are plan's."""
  cfg = _small_tiny(data=2, fsdp=2)
  result = aot.compile_for_tpu(cfg, aot.tpu_target("v5p-8"), dump_hlo=str(tmp_path))
  expected = plan.plan(cfg, 4, compile_check=False, platform="tpu")
  assert result["device_kind"].startswith("TPU v5") and result["fits"]
  assert result["argument_bytes"] == expected["argument_bytes"]
  assert result["flops"] > 0 and result["peak_bytes"] > result["argument_bytes"]
  hlo = (tmp_path / "train_step.hlo.txt").read_text()
  assert hlo.count("tpu_custom_call") >= 3  # flash forward, dq, dk/dv


@needs_libtpu
def test_host_offload_compiles_for_v5p_and_moves_bytes_to_host_memory():
  """train.offload_optimizer + model.remat=offload_dots on a 4-chip v5p: the optimizer state
  is a host-memory argument (plan's bytes on both sides), the saved matmul outputs are host
  temporaries, and the step's peak device memory falls against the same step without them."""
  base = _small_tiny(data=2, fsdp=2)
  cfg = dataclasses.replace(
      base, model=dataclasses.replace(base.model, remat="offload_dots"),
      train=dataclasses.replace(base.train, offload_optimizer=True))
  target = aot.tpu_target("v5p-8")
  before, after = aot.compile_for_tpu(base, target), aot.compile_for_tpu(cfg, target)
  planned = plan.plan(cfg, 4, compile_check=False, platform="tpu")
  assert after["host_argument_bytes"] == planned["host_argument_bytes"] > 0
  assert after["argument_bytes"] == planned["argument_bytes"]
  assert (before["argument_bytes"] - after["argument_bytes"]
          == planned["host_argument_bytes"])
  assert after["host_temp_bytes"] > 0 and before["host_temp_bytes"] == 0
  assert after["peak_bytes"] < before["peak_bytes"]


@needs_libtpu
def test_ring_context_parallel_compiles_for_v5p_with_the_flash_kernel(tmp_path):
  """train.context_parallel=ring over context=2 x data=2: every ring block runs our Mosaic
  kernel inside the shard_map and the cond that picks its chunks, and compiles for v5p."""
  cfg = _small_tiny(data=2, context=2)
  cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, context_parallel="ring"))
  result = aot.compile_for_tpu(cfg, aot.tpu_target("v5p-8"), dump_hlo=str(tmp_path))
  assert result["fits"]
  hlo = (tmp_path / "train_step.hlo.txt").read_text()
  # Forward, dq and dk/dv for its own block and for each branch of the other block's cond.
  assert hlo.count("tpu_custom_call") >= 9
  assert "collective-permute" in hlo


@needs_libtpu
def test_multi_slice_mesh_puts_data_across_slices():
  from jaxllm.parallel import mesh as mesh_lib
  devices = aot.topology_devices(aot.tpu_target("v5e-16", slices=2))
  cfg = _small_tiny(data=2, fsdp=8)
  with pytest.raises(ConfigError, match="mesh.slices=1, but the devices form 2 slices"):
    mesh_lib.make_mesh(cfg.mesh, devices)
  mesh = mesh_lib.make_mesh(config_lib.MeshConfig(data=2, fsdp=8, slices=2), devices)
  grid = mesh.devices.reshape(2, 8)  # [data, fsdp]
  assert [{d.slice_index for d in row} for row in grid] == [{0}, {1}]
  with pytest.raises(ConfigError, match="only the stage and data axes may cross slices"):
    mesh_lib.make_mesh(config_lib.MeshConfig(data=1, fsdp=16, slices=2), devices)


@needs_libtpu
def test_plan_aot_cli_names_the_shortfall_when_the_step_does_not_fit():
  """A ~9B-parameter model on one 16 GiB v5e chip: exit 1, one line with the numbers."""
  cmd = [sys.executable, "-m", "jaxllm.plan", "--config=experiments/tiny.py", "--aot",
         "--topology=v5e-1", "--json", "--config.model.d_model=4096",
         "--config.model.n_heads=32", "--config.model.n_kv_heads=8",
         "--config.model.head_dim=128", "--config.model.d_ff=14336",
         "--config.model.n_layers=8", "--config.train.batch_size=1",
         "--config.train.seq_len=256", "--config.train.grad_accum=1"]
  run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert run.returncode == 1, run.stderr[-2000:]
  result = json.loads(run.stdout)
  assert not result["aot"]["fits"] and result["aot"]["hbm_bytes"] == 16 * 2**30
  # libtpu refuses to compile a program that cannot fit, and says by how much.
  assert "exceeds available HBM" in result["aot"]["compiler_error"]
  error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
  assert len(error) == 1 and "does not fit v5e-1" in error[0], error
  assert "exceeds available HBM" in error[0], error


@needs_libtpu
def test_serving_programs_compile_with_the_paged_kernel_for_one_chip_and_a_tensor_mesh():
  cfg = _small_tiny()
  r = aot.compile_serving(cfg, aot.tpu_target("v6e-8"), batch=4, max_len=256, prefill_chunk=64)
  assert r["device_kind"].startswith("TPU v6") and r["fits"]
  for name in ("prefill", "decode"):
    assert r[name]["kernels"] >= 1 and r[name]["flops"] > 0, (name, r[name])
  assert r["prefill"]["flops"] > r["decode"]["flops"]
  # tensor=4 over 4 heads and 2 KV heads (replicated to 4): each chip a quarter of the pages,
  # our kernel per shard inside shard_map.
  tp = aot.compile_serving(cfg, aot.tpu_target("v6e-8"), batch=4, max_len=256,
                           prefill_chunk=64, mesh="tensor=4")
  assert tp["chips"] == 4 and tp["kv_heads"] == 4 and tp["fits"]
  # 2 -> 4 KV heads, split 4 ways (the page table and lengths stay whole on every chip)
  assert abs(tp["cache_bytes"] - r["cache_bytes"] * 2 / 4) < 0.01 * tp["cache_bytes"]
  assert tp["weight_bytes"] < r["weight_bytes"] / 2
  assert tp["decode"]["kernels"] >= 1 and tp["decode"]["flops"] < r["decode"]["flops"]
