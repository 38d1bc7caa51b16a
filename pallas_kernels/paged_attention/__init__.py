"""Paged attention: decode (one token) or a short run of T tokens per sequence against K/V held
in a page pool via a page table; float or int8 pages; GPU (Triton) and TPU (Mosaic) lowerings."""

from pallas_kernels.paged_attention.api import paged_attention
from pallas_kernels.paged_attention.reference import gather_pages, paged_attention_reference

__all__ = ["paged_attention", "paged_attention_reference", "gather_pages"]
