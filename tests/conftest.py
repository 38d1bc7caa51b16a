"""Test setup: 8 simulated CPU devices (for mesh tests), fast compiles, strict rank promotion,
test tiers.

JAX_PLATFORMS=cuda runs the kernel tests compiled on a GPU instead of interpreted.
Tests marked `slow` run when CI=true (as .ci/run sets) or with `pytest --slow`; the default
local `pytest` skips them to stay fast.
"""

import os

# The suite is mostly XLA:CPU compilation of small programs: LLVM's -O0 backend halves compile
# times (a 8-device MoE train step: 15 s -> 8 s) and slows the tiny programs' run time little.
# Tests that time or train for real in a subprocess set their own XLA_FLAGS.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The AOT tests load libtpu (where installed) in both pytest-xdist workers at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import gc  # noqa: E402

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if jax.default_backend() != "cpu":
  # On a GPU (JAX_PLATFORMS=cuda) float32 matmuls default to TF32: the float32 references the
  # kernels are checked against must be float32.
  jax.config.update("jax_default_matmul_precision", "highest")
# Start the backend now, while XLA_FLAGS is ours: a test module that changes the environment
# at import (collection) can no longer change how many devices every test sees.
jax.devices()


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: heavy test (run by CI and with --slow)")


# The longest files first: with `-n 2 --dist loadfile` a worker takes the default training run
# (~20 minutes on a slow machine) at the start instead of after everything else, so the two
# workers finish together (2026-11-30: it started 48 minutes into a 72-minute run). Only with
# `--no-loadscope-reorder`: pytest-xdist 3.8 otherwise re-sorts files by test count, and the
# one-test default run goes last (2026-12-02: 50 minutes into a 74-minute run; BUILD.md).
FIRST = ("test_default_run.py", "test_bench.py", "test_multiprocess.py", "test_server.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: files stay whole
  if config.getoption("--slow") or os.environ.get("CI", "").lower() == "true":
    return
  skip = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with --slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def free_compiled_programs():
  """Drops every compiled program when a test file ends.

  XLA:CPU maps each executable's code into the process in several memory regions, and the jit
  caches of module-level functions (static graphdefs, shapes) keep them alive. One pytest-xdist
  worker taking half the suite passed Linux's 65530 mappings per process (vm.max_map_count):
  test_inference + test_engine + test_server alone reach 35k, and the next compile segfaulted
  inside LLVM (CI, 2026-11-30). Clearing per file keeps a worker near 1-5k; programs shared within a
  file (module fixtures) are unaffected.
  """
  yield
  jax.clear_caches()
  gc.collect()
