"""Pallas attention kernels, each with a GPU (Triton) and a TPU (Mosaic) lowering.

`flash_attention` for training and prefill; `paged_attention` for decoding against a paged KV
cache. Both run on CPU in the Pallas interpreter (`interpret=True`).
"""

from pallas_kernels.flash_attention import BlockSizes, attention_reference, flash_attention
from pallas_kernels.paged_attention import paged_attention, paged_attention_reference



def flash_attention_head_dims() -> tuple[int, ...]:
  """Head sizes the flash-attention kernel supports."""
  from pallas_kernels.flash_attention.api import HEAD_DIMS
  return HEAD_DIMS


__all__ = [
    "BlockSizes", "attention_reference", "flash_attention", "flash_attention_head_dims", "paged_attention",
    "paged_attention_reference"
]
