"""Flash attention: blockwise online-softmax forward (saving the log-sum-exp) and a recomputing
backward, with a GPU (Triton) and a TPU (Mosaic) lowering and a plain-jnp reference."""

from pallas_kernels.flash_attention.api import flash_attention
from pallas_kernels.flash_attention.common import BlockSizes
from pallas_kernels.flash_attention.reference import attention_reference

__all__ = ["flash_attention", "BlockSizes", "attention_reference"]
