"""The grouped-matmul kernel (MoE experts) against its plain-jnp reference and
`jax.lax.ragged_dot`: forward and gradients, interpreted on CPU, compiled where the default
device is a GPU; its Triton lowering for an H100; the MoE layer through it."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from jaxllm.ops import moe as moe_ops
from pallas_kernels import backends
from pallas_kernels.grouped_matmul import BlockSizes

INTERPRET = not backends.runs_natively("gpu")
SMALL = BlockSizes(block_m=16, block_n=32, block_k=16)


@pytest.mark.parametrize("M, K, N, sizes", [
    (100, 32, 48, [30, 0, 17, 40, 5]),   # empty group, groups sharing tiles, 8 padding rows
    (64, 64, 32, [64]),                  # one group, whole tiles
    (37, 16, 16, [0, 0, 37]),            # leading empty groups, M not a tile multiple
    (96, 32, 64, [1, 1, 1, 90, 3]),      # groups of one row
])
def test_forward_and_gradients_match_the_reference(M, K, N, sizes):
  rng = np.random.default_rng(M + K)
  E = len(sizes)
  gs = jnp.asarray(sizes, jnp.int32)
  x = jnp.asarray(rng.normal(size=(M, K)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(E, K, N)), jnp.float32)
  probe = jnp.asarray(rng.normal(size=(M, N)), jnp.float32)
  ours = lambda x, w: pk.grouped_matmul(x, w, gs, block_sizes=SMALL, interpret=INTERPRET)
  got = ours(x, w)
  chex.assert_trees_all_close(got, pk.grouped_matmul_reference(x, w, gs), atol=1e-4)
  chex.assert_trees_all_close(got, jax.lax.ragged_dot(x, w, gs, precision="highest"), atol=1e-4)
  tiled = moe_ops.grouped_matmul(x, w, gs, impl="tiled")  # the XLA path CPUs take
  chex.assert_trees_all_close(tiled, pk.grouped_matmul_reference(x, w, gs), atol=1e-4)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * probe)
  g = jax.grad(loss(ours), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: pk.grouped_matmul_reference(x, w, gs)), argnums=(0, 1))(x, w)
  chex.assert_trees_all_close(g, want, atol=1e-4)


def test_bfloat16():
  rng = np.random.default_rng(1)
  gs = jnp.asarray([40, 24, 0, 64], jnp.int32)
  x = jnp.asarray(rng.normal(size=(128, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(4, 64, 64)), jnp.bfloat16)
  got = pk.grouped_matmul(x, w, gs, block_sizes=SMALL, interpret=INTERPRET)
  want = pk.grouped_matmul_reference(x, w, gs).astype(jnp.float32)
  assert got.dtype == jnp.bfloat16
  rel = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
  assert rel <= 1e-2, rel


def test_work_list_visits_each_group_tile_pair_once():
  work = jax.device_get(pk.grouped_matmul.__globals__["work_list"](
      jnp.asarray([5, 0, 20, 3], jnp.int32), 32, 16))
  items = [(int(g), int(t)) for g, t in zip(work.item_group, work.item_tile) if g <= 4]
  # rows 0-4 group 0, 5-24 group 2, 25-27 group 3, 28-31 the zero tail (group 4).
  assert items == [(0, 0), (2, 0), (2, 1), (3, 1), (4, 1)]


def test_lowers_for_an_h100():
  S = jax.ShapeDtypeStruct
  args = (S((1024, 512), jnp.bfloat16), S((8, 512, 1024), jnp.bfloat16), S((8,), jnp.int32))
  loss = lambda x, w, g: jnp.sum(pk.grouped_matmul(x, w, g, backend="gpu"))
  fwd_bwd = lambda x, w, g: jax.value_and_grad(loss, argnums=(0, 1))(x, w, g)
  text = backends.lower_for("gpu", fwd_bwd, *args)
  assert text.count("__gpu$xla.gpu.triton") >= 3  # gmm, transposed gmm, tgmm


@pytest.mark.parametrize("x_shape, w_shape, sizes, match", [
    ((8, 16), (2, 32, 16), [4, 4], "x \\[M, K\\]"),
    ((8, 16), (2, 16, 24), [4, 4], "multiples of 16"),
    ((8, 16), (2, 16, 16), [8], "group_sizes"),
])
def test_bad_input_is_a_clear_error(x_shape, w_shape, sizes, match):
  with pytest.raises(ValueError, match=match):
    pk.grouped_matmul(jnp.zeros(x_shape), jnp.zeros(w_shape), jnp.asarray(sizes, jnp.int32),
                      interpret=True)


def test_moe_layer_through_the_kernel_equals_ragged_dot():
  from jaxllm.model import moe
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(24, 32)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 4, size=(24, 2)), jnp.int32)
  ex = moe.Experts(*(jnp.asarray(rng.normal(0, 0.3, s), jnp.float32)
                     for s in ((4, 32, 16), (4, 32, 16), (4, 16, 32))))
  probe = jnp.asarray(rng.normal(size=(24, 2, 32)), jnp.float32)
  run = lambda impl: jax.value_and_grad(
      lambda ex: jnp.sum(moe.dropless(x, ids, ex, impl=impl) * probe))(ex)
  chex.assert_trees_all_close(run("pallas"), run("xla"), atol=2e-4, rtol=1e-4)
