"""Grouped matmul (the MoE experts' GEMM): rows sorted by group, each group times its own
weight; a GPU (Triton) lowering, differentiable, and a plain-jnp reference."""

from pallas_kernels.grouped_matmul.api import BlockSizes, grouped_matmul, work_list
from pallas_kernels.grouped_matmul.reference import grouped_matmul_reference

__all__ = ["BlockSizes", "grouped_matmul", "grouped_matmul_reference", "work_list"]
