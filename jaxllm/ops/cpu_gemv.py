"""Small-batch matrix products on XLA:CPU that stream weights at memory bandwidth.

XLA:CPU's own code for a decode step's `[M <= 16, I] @ [I, O]` products is slow where it
matters most: a float32 weight streams at about half the machine's read bandwidth, and an int8
or int4 weight, converted and scaled element by element, at a few GB/s (an int8 tied head
`[V, D]` at under 1 GB/s). `cpu_gemv.cc` does these products in C++, registered with XLA as a
typed FFI handler: float32, int8 and packed int4 weights (QTensor's layout, group scales and
zero points) read once, in order, split between the calling thread and helper threads of
the library's own (they spin between a decode step's calls; see `Team` in the source). The
same library serves a decode step's attention over a contiguous or paged cache
(`jaxllm.ops.cpu_attention`).

The library is compiled on first use with the system's C++ compiler against the installed
jaxlib's FFI headers (`-march=native`: the machine that runs it), cached under
`$JAXLLM_CACHE/kernels` keyed by the source, the jaxlib version and the CPU; without a compiler
(or if the build fails) every product takes XLA's path, after one warning.

Which path a product takes is `cpu_kernel(mode)`, a context read when the step traces: "auto"
(the default: on a single CPU device, for float32 x of at most `MAX_ROWS` rows), "always"
(on any CPU backend and device count: the tests) or "never" (XLA's path).
"""

from __future__ import annotations

import contextvars
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.ops import kernel_mode, stacked
from jaxllm.quant import tensor as qtensor
from pallas_kernels import backends

# The most x rows for which the kernel beats XLA, measured on a 2-core AVX-512 machine (docs/quantization.md,
# "the CPU decode kernel"): it sweeps the weights once per x row of a block, so XLA's GEMM wins
# as rows grow, sooner for float32 weights (XLA's float dots are fast) than for quantized ones.
# A float32 table (the tied head) stays with XLA's own product, as fast as the kernel's.
MAX_ROWS = {"float": 2, "quantized": 8, "quantized_table": 16}
TARGET = "jaxllm_cpu_gemv"
ATTENTION_TARGET = "jaxllm_cpu_decode_attention"  # served by jaxllm.ops.cpu_attention
PAGED_ATTENTION_TARGET = "jaxllm_cpu_paged_decode_attention"  # likewise
_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gemv.cc")
_MODE = contextvars.ContextVar("cpu_kernel", default="auto")
_log = logging.getLogger(__name__)


def cpu_kernel(mode: str):
  """Within the block (and the jitted functions traced in it), small-batch products on CPU
  take the C++ kernel per `mode`: auto | always | never."""
  return kernel_mode.scoped(_MODE, mode, "cpu kernel")


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return platform.processor()


def _compile(out_path: str) -> None:
  compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (g++/c++) on PATH")
  directory = os.path.dirname(out_path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
  os.close(fd)
  try:
    cmd = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-march=native",
           "-mprefer-vector-width=512", "-w", f"-I{jax.ffi.include_dir()}", _SOURCE,
           "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")
    os.replace(tmp, out_path)  # atomic: a concurrent process sees all of it or nothing
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


@functools.lru_cache(maxsize=None)
def _register(path: str) -> None:
  """Loads a built library and registers its handler with XLA (once per process and path)."""
  library = ctypes.cdll.LoadLibrary(path)
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxllmGemv), platform="cpu")
  jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(library.JaxllmDecodeAttention),
                              platform="cpu")
  jax.ffi.register_ffi_target(PAGED_ATTENTION_TARGET,
                              jax.ffi.pycapsule(library.JaxllmPagedDecodeAttention),
                              platform="cpu")


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the kernel library is built and registered with XLA (built on first call)."""
  from jaxllm import config
  try:
    with open(_SOURCE, "rb") as f:
      key = hashlib.sha256(f.read() + jax.__version__.encode() + _cpu_flags().encode()
                           + platform.machine().encode()).hexdigest()[:16]
    path = os.path.join(config.cache_dir(), "kernels", f"cpu_gemv-{key}.so")
    if not os.path.exists(path):
      _compile(path)
    _register(path)
    return True
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    _log.warning("jaxllm CPU kernel unavailable, XLA's matmuls instead: %s", e)
    return False


def enabled() -> bool:
  """Whether `cpu_kernel`'s mode lets the library's kernels run in the step being traced: on
  the CPU backend, and in "auto" only on a single device (sharded arrays: XLA's partitioner
  knows its own ops, not these custom calls). Built on first call."""
  mode = _MODE.get()
  if mode == "never" or backends.target_platform() != "cpu":
    return False
  return (mode == "always" or jax.device_count() == 1) and available()


def applies(x: jax.Array, w, in_axes: int = 1, *, rows: bool = False) -> bool:
  """Whether x `[..., *in]` and weight `w` go through the kernel: `matmul` (w `[*in, *out]`)
  or, with `rows`, `matmul_rows` (w an embedding table `[V, D]`)."""
  if x.dtype != jnp.float32 or not enabled():
    return False
  if isinstance(w, stacked.LayerView):
    w = w.get()  # its shape and kind (XLA drops the slice when the kernel takes the stack)
  if qtensor.is_qtensor(w):
    ok = w.values.ndim == (3 if rows else 2)  # one matrix (the table: `[V, D, 1]`)
    limit = MAX_ROWS["quantized_table" if rows else "quantized"]
  else:
    ok = w.dtype == jnp.float32 and w.ndim >= 2 and not rows
    limit = MAX_ROWS["float"]
  return ok and math.prod(x.shape[:x.ndim - in_axes]) <= limit


def _call(x2, values, scales, zeros, out_cols, *, bits, group, rows_layout, layer=None):
  """The FFI call. `layer` None: values/scales/zeros are one matrix's; else they are stacked
  `[L, ...]` and the kernel reads layer `layer` in place."""
  if layer is None:
    values, scales, zeros = (None if a is None else a[None] for a in (values, scales, zeros))
    layer = 0
  empty = jnp.zeros((0,), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x2.shape[0], out_cols), jnp.float32),
                          vmap_method="sequential")
  return call(x2, values, empty if scales is None else scales,
              empty if zeros is None else zeros, jnp.asarray(layer, jnp.int32),
              bits=np.int64(bits), group=np.int64(group), has_zeros=zeros is not None,
              rows_layout=rows_layout)


def _padded(x2: jax.Array, rows: int) -> jax.Array:
  return jnp.pad(x2, ((0, 0), (0, rows - x2.shape[1]))) if rows > x2.shape[1] else x2


def _matmul(x2: jax.Array, w) -> jax.Array:
  layer = None
  if isinstance(w, stacked.LayerView):
    w, layer = w.stack, w.index
  lead = w.shape[:1] if layer is not None and not qtensor.is_qtensor(w) else ()  # [L]
  if not qtensor.is_qtensor(w):
    I = x2.shape[1]
    cols = math.prod(w.shape[len(lead):]) // I
    return _call(x2, w.reshape(*lead, I, cols), None, None, cols, bits=0, group=0,
                 rows_layout=False, layer=layer)
  G, g = w.num_groups, w.group_size
  return _call(_padded(x2, G * g), w.values, w.scales, w.zeros, w.cols, bits=w.bits, group=g,
               rows_layout=False, layer=layer)


def _matmul_rows(x2: jax.Array, table) -> jax.Array:
  if not qtensor.is_qtensor(table):
    return _call(x2, table, None, None, table.shape[0], bits=0, group=0, rows_layout=True)
  V, G, g = table.values.shape[0], table.num_groups, table.group_size
  zeros = None if table.zeros is None else table.zeros.reshape(V, G)
  return _call(_padded(x2, G * g), table.values.reshape(V, -1), table.scales.reshape(V, G),
               zeros, V, bits=table.bits, group=g, rows_layout=True)


def _float(w) -> jax.Array:
  w = w.get() if isinstance(w, stacked.LayerView) else w
  return w.dequantize() if qtensor.is_qtensor(w) else w


def _no_cotangent(w):
  """A QTensor's cotangent: its integers have none (float0), its scales get zeros (quantized
  weights are not trained)."""
  def zero(a):
    if jnp.issubdtype(a.dtype, jnp.integer):
      return np.zeros(a.shape, jax.dtypes.float0)
    return jnp.zeros_like(a)
  return jax.tree.map(zero, w)


@jax.custom_vjp
def matmul(x2: jax.Array, w) -> jax.Array:
  """x `[M, I]` float32 times w `[I, O]` (float32 `[*in, *out]`, or a QTensor of one
  matrix) -> `[M, O]` float32. Differentiable (the backward pass is XLA's): a float weight
  gets its gradient, so a training step may take this path too."""
  return _matmul(x2, w)


def _matmul_bwd(residuals, dy):
  x2, w = residuals
  if isinstance(w, stacked.LayerView):
    raise NotImplementedError("gradients through a LayerView (inference's by-index layer "
                              "scan); train through sliced params")
  w_io = _float(w).reshape(x2.shape[1], -1)
  dw = _no_cotangent(w) if qtensor.is_qtensor(w) else (x2.T @ dy).reshape(w.shape)
  return dy @ w_io.T, dw


matmul.defvjp(lambda x2, w: (_matmul(x2, w), (x2, w)), _matmul_bwd)


@jax.custom_vjp
def matmul_rows(x2: jax.Array, table) -> jax.Array:
  """x `[M, D]` float32 times an embedding table `[V, D]` transposed -> `[M, V]` float32
  (the table float32, or a QTensor laid out as `quant.params.LAYOUTS["embed"]`)."""
  return _matmul_rows(x2, table)


def _matmul_rows_bwd(residuals, dy):
  x2, table = residuals
  d_table = _no_cotangent(table) if qtensor.is_qtensor(table) else dy.T @ x2
  return dy @ _float(table), d_table


matmul_rows.defvjp(lambda x2, t: (_matmul_rows(x2, t), (x2, t)), _matmul_rows_bwd)
