"""Pallas kernels: attention, each with a GPU (Triton) and a TPU (Mosaic) lowering, and the MoE
grouped matmul (GPU).

`flash_attention` for training and prefill; `paged_attention` for decoding against a paged KV
cache; `grouped_matmul` for the experts of an MoE layer. All run on CPU in the Pallas
interpreter (`interpret=True`).
"""

from pallas_kernels.flash_attention import BlockSizes, attention_reference, flash_attention
from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_reference
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference



def flash_attention_head_dims() -> tuple[int, ...]:
  """Head sizes the flash-attention kernel supports."""
  from pallas_kernels.flash_attention.api import HEAD_DIMS
  return HEAD_DIMS


__all__ = [
    "BlockSizes", "attention_reference", "flash_attention", "flash_attention_head_dims",
    "grouped_matmul", "grouped_matmul_reference", "paged_attention", "paged_attention_reference"
]
