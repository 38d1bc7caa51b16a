"""The server's KV pool from a memory budget (`jaxllm.inference.kv_budget`); the reference for
a page's bytes is the engine's own page arrays (`model.cache.zeros`)."""

import jax
import pytest

from jaxllm.inference import kv_budget
from jaxllm.model import cache
from tests.helpers import tiny_model

CFG = tiny_model()  # 2 layers, 2 KV heads of 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_bytes_per_token_are_the_page_arrays_bytes(dtype):
  page_size = 16
  # One page of K (V is the same) for every layer, as the engine allocates its pool.
  page = cache.zeros((CFG.n_layers, 1, page_size, CFG.n_kv_heads, CFG.head_dim), dtype)
  nbytes = sum(x.nbytes for x in jax.tree.leaves(page))
  assert kv_budget.bytes_per_token(CFG, dtype) * page_size == 2 * nbytes


def test_pages_follow_the_budget_between_one_sequence_and_every_slot():
  per_page = kv_budget.bytes_per_token(CFG, "float32") * 16  # 4 KiB
  pages = lambda budget, slots=8: kv_budget.num_pages(
      CFG, "float32", page_size=16, max_slots=slots, longest=128, budget=budget)[0]
  assert pages(f"{20 * per_page}") == 20  # bare bytes
  assert pages("100KiB") == 100 * 1024 // per_page == 25
  assert pages("1GiB") == 8 * 8  # never more than every slot full-length
  assert pages(None) == 8 * 8  # the CPU default, 1 GiB, is more than this model needs
  assert kv_budget.num_pages(CFG, "float32", page_size=16, max_slots=8, longest=128,
                             budget="40KiB")[1] == "--kv_memory=40KiB"
  with pytest.raises(ValueError, match="holds 7 pages of 16 tokens, fewer than one "
                     "128-token sequence needs \\(8\\)"):
    pages(f"{7 * per_page}")
  with pytest.raises(ValueError, match="a fraction needs an accelerator"):
    pages("0.5")
  for bad in ("lots", "2TB", "-1GiB", "0"):
    with pytest.raises(ValueError, match="--kv_memory"):
      pages(bad)
