"""Expert parallelism: MoE training on 8 simulated devices equals the single-device run.

Each mesh runs 3 float32 train steps (dropless, load-balancing and z losses on, routing bias
updated) from the same init on the same batches; loss and every updated parameter must match
the 1-device run within 1e-5 relative. Token exchange between expert shards is all-to-all.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm.parallel import mesh as mesh_lib
from jaxllm.train import loop, step as step_lib
from tests.helpers import tiny_experiment
from tests.test_parallel import _batches, _train

# 8 experts of width 32; layers: dense, MoE, dense, MoE (moe_every=2); every sharded dim
# divides by the mesh axes used.
MODEL = dict(vocab_size=384, d_model=64, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=8,
             d_ff=128, dtype="float32", n_experts=8, experts_per_token=2, moe_d_ff=32,
             moe_every=2, n_shared_experts=1, router_bias_update_rate=0.01)
MESHES = {  # EP2 alone is covered by the mixes
    "ep4": dict(expert=4),
    "ep8": dict(expert=8),
    "ep2_fsdp2_tp2": dict(expert=2, fsdp=2, tensor=2),
    "ep2_dp2_tp2": dict(expert=2, data=2, tensor=2),
    "ep2_pp2_fsdp2": dict(expert=2, stage=2, fsdp=2),
}


def _config(mesh, **model):
  return tiny_experiment(model={**MODEL, **model},
                         train=dict(batch_size=8, seq_len=32, microbatches=2),
                         mesh={"data": 1, "fsdp": 1, "tensor": 1, **mesh})


@pytest.fixture(scope="module")
def single_device():
  return _train(_config({"data": 1}), jax.devices()[:1])


def _assert_same(state, losses, want_state, want_losses):
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  flat = jax.tree_util.tree_leaves_with_path(jax.device_get(state["params"]))
  want = dict(jax.tree_util.tree_leaves_with_path(jax.device_get(want_state["params"])))
  for path, got in flat:
    ref = want[path]
    rel = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12)
    assert rel <= 1e-5, (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize("name", list(MESHES))
def test_expert_parallel_training_equals_single_device(name, single_device):
  mesh = MESHES[name]
  n = int(np.prod(list(mesh.values())))
  _assert_same(*_train(_config(mesh), jax.devices()[:n]), *single_device)


def test_capacity_mode_under_expert_parallelism_equals_single_device():
  """With room for every slot the capacity buffers travel by all-to-all and change nothing."""
  cfg = lambda mesh: _config(mesh, capacity_factor=8.0)
  want = _train(cfg({"data": 1}), jax.devices()[:1])
  _assert_same(*_train(cfg(dict(expert=4, data=2)), jax.devices()), *want)


def test_experts_are_split_over_the_expert_axis_and_exchanged_by_all_to_all():
  cfg = _config(MESHES["ep4"])
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:4])
  graphdef, abstract_state, shardings, optimizer = loop.state_shardings(cfg, mesh)
  moe = shardings["params"]["moe_blocks"]["moe"]
  assert moe["gate"].spec == P(None, "expert", None, None)  # [Lm, E, D, F]
  assert moe["down"].spec == P(None, "expert", None, None)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, shardings)
  batch = {k: jax.ShapeDtypeStruct((8, 32), np.float32 if k == "weights" else np.int32)
           for k in _batches(cfg, 1)[0]}
  step = jax.jit(step_lib.make_train_step(graphdef, optimizer, cfg.train))
  with jax.set_mesh(mesh):
    text = step.lower(state, batch).as_text()
  assert "all_to_all" in text
