"""jaxllm: train, shard, quantize and serve decoder-only LLMs with JAX."""

__version__ = "0.1.0"


def load(path, mesh=None, **kwargs):
  """Loads a model for inference, on one device or split over `mesh` ("tensor=4", or a
  `jax.sharding.Mesh`); see `jaxllm.api.load`."""
  from jaxllm.api import load as _load  # jax is imported on first use, not on `import jaxllm`
  return _load(path, mesh=mesh, **kwargs)
