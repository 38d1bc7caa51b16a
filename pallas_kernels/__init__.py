"""Pallas attention kernels (flash attention, paged attention) with GPU and TPU lowerings.

Empty until the kernels issue lands; `jaxllm.ops.attention` uses its XLA reference meanwhile.
"""
