"""Dynamic loss scaling for float16 training (Micikevicius et al. 2018, "Mixed Precision
Training").

float16 has 5 exponent bits: gradients of activations below ~6e-8 flush to zero, above 65504
they overflow. The loss is multiplied by a scale S before the backward pass (lifting small
cotangents into range) and the float32 gradients divided by S after it. A step whose gradients
are not all finite overflowed: it is skipped (parameters and optimizer state kept) and S halves;
after `period` finite steps in a row S doubles, probing for the largest safe scale. S never
falls below 1: a run that overflows even unscaled has diverged (the loop stops it).

The scale state is a part of the train state (`{"scale": f32[], "good_steps": i32[]}`), so it is
checkpointed and a resumed run continues with the same scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FACTOR = 2.0


def init(scale: float) -> dict[str, jax.Array]:
  return {"scale": jnp.asarray(scale, jnp.float32), "good_steps": jnp.zeros((), jnp.int32)}


def all_finite(tree) -> jax.Array:
  """bool []: every element of every leaf is finite."""
  return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def adjust(state: dict[str, jax.Array], finite: jax.Array, period: int) -> dict[str, jax.Array]:
  """The scale after a step whose gradients were (not) `finite`."""
  good = jnp.where(finite, state["good_steps"] + 1, 0)
  grow = good >= period
  scale = jnp.where(finite, jnp.where(grow, state["scale"] * FACTOR, state["scale"]),
                    jnp.maximum(state["scale"] / FACTOR, 1.0))
  return {"scale": scale, "good_steps": jnp.where(grow, 0, good).astype(jnp.int32)}


def keep_if(finite: jax.Array, new, old):
  """`new` where the step was finite, else `old`, leaf by leaf (a skipped update)."""
  return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
