"""The fused int4 dequantize-matmul kernel against dequantize-then-matmul (interpreted on CPU,
compiled where the default device is a GPU), and its Triton lowering for an H100."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxllm.quant import tensor as qt
from pallas_kernels import backends
from pallas_kernels.int4_matmul import int4_matmul

INTERPRET = not backends.runs_natively("gpu")


@pytest.mark.parametrize("M, I, O, g, symmetric, split_k", [
    (3, 200, 128, 64, True, 1),     # ragged last group, M padded to a tile
    (16, 256, 64, 128, False, 1),   # zero points
    (1, 576, 128, 128, True, 1),    # SmolLM2's width: 4.5 groups of 128
    (40, 128, 192, 32, False, 1),   # several row and column tiles
    (2, 512, 128, 64, False, 4),    # groups split among programs
])
def test_matches_dequantize_then_matmul(M, I, O, g, symmetric, split_k):
  rng = np.random.default_rng(M + I)
  q = qt.quantize(jnp.asarray(rng.standard_normal((I, O)), jnp.float32), bits=4, group_size=g,
                  symmetric=symmetric)
  x = jnp.asarray(rng.standard_normal((M, I)), jnp.float32)
  got = int4_matmul(x, q.values, q.scales, q.zeros, split_k=split_k, interpret=INTERPRET)
  want = jnp.dot(x, q.dequantize(), precision="highest")
  assert got.shape == (M, O) and got.dtype == jnp.float32
  # Products of small integers and float32 scales: float32 rounding only.
  assert float(jnp.abs(got - want).max()) <= 1e-4 * float(jnp.abs(want).max())


def test_bfloat16_activations():
  rng = np.random.default_rng(1)
  q = qt.quantize(jnp.asarray(rng.standard_normal((256, 128)), jnp.float32), bits=4,
                  group_size=128)
  x = jnp.asarray(rng.standard_normal((8, 256)), jnp.bfloat16)
  got = int4_matmul(x, q.values, q.scales, None, interpret=INTERPRET)
  want = jnp.dot(x.astype(jnp.float32), q.dequantize(), precision="highest")
  assert got.dtype == jnp.bfloat16
  rel = float(jnp.abs(got.astype(jnp.float32) - want).max() / jnp.abs(want).max())
  assert rel <= 1e-2, rel  # bf16 output rounding; the integers are exact in bf16


def test_lowers_for_an_h100():
  S = jax.ShapeDtypeStruct
  args = (S((4, 4096), jnp.bfloat16), S((2048, 4096), jnp.uint8), S((32, 4096), jnp.float32))
  text = backends.lower_for("gpu", lambda x, w, s: int4_matmul(x, w, s, None), *args)
  assert "__gpu$xla.gpu.triton" in text


@pytest.mark.parametrize("change, match", [
    (dict(packed_dtype=jnp.int8), "uint8"), (dict(I=300), "columns"), (dict(O=96), "block_n"),
    (dict(split_k=3), "split_k")])
def test_bad_input_is_a_clear_error(change, match):
  I, O = change.get("I", 256), change.get("O", 128)
  packed = jnp.zeros((128, O), change.get("packed_dtype", jnp.uint8))
  with pytest.raises(ValueError, match=match):
    int4_matmul(jnp.zeros((2, I)), packed, jnp.ones((2, O)), None,
                split_k=change.get("split_k", 1), interpret=True)


def test_model_matmuls_through_the_kernel_equal_dequantize_then_matmul(monkeypatch):
  """`ops.quant_matmul.project` sends eligible int4 weights through the kernel (on CPU when told
  to, interpreted): the model's logits match the dequantize-then-dot path."""
  from flax import nnx

  from jaxllm.model import transformer
  from jaxllm.ops import quant_matmul as matmul
  from jaxllm.quant import params as qparams
  from tests.helpers import tiny_model
  cfg = tiny_model(dtype="float32", d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, d_ff=128)
  graphdef, params = transformer.split(transformer.create(cfg, 0))
  qp, _ = qparams.quantize_params(params, qparams.QuantSpec(bits=4, group_size=32))
  ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % cfg.vocab_size
  calls = []
  real = matmul.fused
  monkeypatch.setattr(matmul, "fused", lambda w: calls.append(real(w)) or calls[-1])
  logits = {}
  for mode in ("never", "always"):
    calls.clear()
    with matmul.int4_kernel(mode):
      logits[mode] = jax.jit(lambda p: nnx.merge(graphdef, p)(ids))(qp)
    if mode == "always":  # q, o, gate, up, down fit the kernel (k/v's 32 columns do not)
      assert sum(calls) == 5 and len(calls) == 7
  rel = float(jnp.abs(logits["always"] - logits["never"]).max()
              / jnp.abs(logits["never"]).max())
  assert rel < 1e-4, rel
