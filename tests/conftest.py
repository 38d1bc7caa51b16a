"""Test setup: 8 simulated CPU devices (for mesh tests), fast compiles, strict rank promotion,
test tiers.

JAX_PLATFORMS=cuda runs the kernel tests compiled on a GPU instead of interpreted.
Tests marked `slow` run when CI=true (as .ci/run sets) or with `pytest --slow`; the default
local `pytest` skips them to stay fast.
"""

import os

from tests.helpers import xla_flags  # imports no JAX

# The suite is mostly XLA:CPU compilation of small programs: LLVM's -O0 backend halves compile
# times (a 8-device MoE train step: 15 s -> 8 s) and slows the tiny programs' run time little.
# Subprocesses get the same through helpers.xla_flags; only the default run keeps XLA's own.
os.environ.setdefault("XLA_FLAGS", xla_flags(devices=8))
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
  parser.addoption("--without-parity", action="store_true",
                   help="leave out the tests that need the parity extra (torch, transformers); "
                   "CI runs them in its oldest-JAX stage")


# Tests that need the `parity` extra (torch, transformers, lm-eval): whole files, or single tests.
# Marked `parity`; CI's main run (newest python and JAX, no torch) leaves them out with
# --without-parity and its oldest-JAX stage (python 3.11, torch's CPU build) runs `-m parity`.
PARITY_FILES = ("test_hf_parity.py", "test_model_families.py", "test_moe_checkpoints.py",
                "test_lora_peft.py", "test_preference_trl.py", "test_rl_trl.py",
                "test_reward_hf.py", "test_lm_eval.py")
PARITY_TESTS = ("test_bench.py::test_bench_decode_json",)
# The oldest supported JAX runs these besides the parity tests (files, or file::test): the
# model, training and its bitwise resume, the checkpoint round trip and generation, each through
# its real entry point.
OLDEST_JAX_SMOKE = ("test_model.py",
                    "test_train.py::test_short_run_loss_falls_and_workdir_is_complete",
                    "test_train.py::test_resume_after_preemption_is_bitwise_exact",
                    "test_generate.py::test_cached_greedy_generation_equals_recompute",
                    "test_generate.py::test_generate_cli")

# The only skips CI accepts (test id -> why it cannot run in CI). Any other skip fails a CI run:
# a missing compiler, libtpu, extra or python would otherwise leave CI green with tests unrun.
ALLOWED_SKIPS = {
    "tests/test_attention_ops.py::test_cudnn_runs_alibi_and_segments_on_a_gpu":
        "cuDNN needs a GPU (tools/gpu_checks.sh runs it)",
}


def _in_ci() -> bool:
  return os.environ.get("CI", "").lower() == "true"


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: heavy test (run by CI and with --slow)")
  config.addinivalue_line("markers", "parity: needs torch and transformers (the parity extra)")
  config.addinivalue_line("markers", "oldest_jax: run again on the oldest supported JAX")
  if _in_ci() and not hasattr(config, "workerinput"):
    config.pluginmanager.register(SkipGuard(), "jaxllm_skip_guard")


def pytest_ignore_collect(collection_path, config):
  if config.getoption("--without-parity") and collection_path.name in PARITY_FILES:
    return True  # their module-level importorskip would report a skip
  return None


# The longest files first (worker seconds in tools/ci_times.py's table): with `-n 2 --dist
# loadfile --no-loadscope-reorder` (.ci/run) a worker takes the default training run at the
# start instead of after everything else, and the two workers finish together. pytest-xdist
# 3.8 without --no-loadscope-reorder re-sorts files by test count, and the one-test default run
# went last (2026-12-02: 50 minutes into a 74-minute run; docs/testing.md).
FIRST = ("test_default_run.py", "test_parallel.py", "test_bench.py", "test_engine.py",
         "test_flash_attention.py", "test_readme_snippets.py", "test_moe_parallel.py", "test_speculative.py",
         "test_multiprocess.py", "test_moe.py", "test_quant.py", "test_sharded_inference.py",
         "test_training_options.py", "test_data_mixing.py", "test_server.py")


@pytest.hookimpl(tryfirst=True)  # markers before `-m` selects on them
def pytest_collection_modifyitems(config, items):
  for item in items:
    name = item.path.name
    if name in PARITY_FILES or f"{name}::{item.name}" in PARITY_TESTS:
      item.add_marker(pytest.mark.parity)
    if name in OLDEST_JAX_SMOKE or f"{name}::{item.originalname}" in OLDEST_JAX_SMOKE:
      item.add_marker(pytest.mark.oldest_jax)
  if config.getoption("--without-parity"):
    kept = [item for item in items if "parity" not in item.keywords]
    config.hook.pytest_deselected(items=[item for item in items if "parity" in item.keywords])
    items[:] = kept
  rank = {name: i for i, name in enumerate(FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: files stay whole
  if config.getoption("--slow") or _in_ci():
    return
  skip = pytest.mark.skip(reason="slow: runs in CI (CI=true) or with --slow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)


class SkipGuard:
  """Fails a CI run in which a test skipped outside ALLOWED_SKIPS (registered in the process
  that gets every report: pytest-xdist's controller, or pytest alone)."""

  def __init__(self):
    self.unexpected = []

  def _note(self, report):
    if report.skipped and report.nodeid not in ALLOWED_SKIPS and not hasattr(report, "wasxfail"):
      reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
      self.unexpected.append(f"{report.nodeid or '(collection)'}: {reason}")

  def pytest_runtest_logreport(self, report):
    self._note(report)

  def pytest_collectreport(self, report):
    self._note(report)

  def pytest_terminal_summary(self, terminalreporter):
    if self.unexpected:
      terminalreporter.section("skipped outside ALLOWED_SKIPS in tests/conftest.py: CI fails")
      for line in self.unexpected:
        terminalreporter.write_line(line)

  def pytest_sessionfinish(self, session):
    if self.unexpected:
      session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> str:
  """Path of `helpers.write_tiny_chat_model`'s Hugging Face directory (one per worker)."""
  from tests import helpers
  return helpers.write_tiny_chat_model(str(tmp_path_factory.mktemp("tiny_chat_model")))


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
