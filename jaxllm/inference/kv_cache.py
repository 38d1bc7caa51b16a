"""KV caches and page bookkeeping under their earlier single name (kept for code written
against it): the device-side caches live in `jaxllm.model.cache`, the host-side page allocator
in `jaxllm.inference.paging`."""

from jaxllm.inference.paging import OutOfPages, PageAllocator, page_table_array, pages_for
from jaxllm.model.cache import (Int8KV, KVCache, PagedKVCache, init_cache, init_paged_cache,
                                quantize_kv, read, with_lengths, write, write_paged, zeros)

__all__ = ["Int8KV", "KVCache", "OutOfPages", "PageAllocator", "PagedKVCache", "init_cache",
           "init_paged_cache", "page_table_array", "pages_for", "quantize_kv", "read",
           "with_lengths", "write", "write_paged", "zeros"]
