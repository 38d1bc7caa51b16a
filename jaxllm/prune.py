"""`python -m jaxllm.prune --checkpoint=PATH --out=DIR --method=magnitude|wanda|sparsegpt
(--sparsity=0.5 | --pattern=2:4) [--bits=4|8] [--calib_data --calib_rows --calib_len --exclude]`

Reads any checkpoint `jaxllm.load` reads and writes a pruned jaxllm directory (config,
tokenizer, orbax params with zeros where pruned, and `sparsity.json`: the method, the target
and each weight's sparsity per layer) that load, generate, eval, serve, quantize and convert
accept. Wanda and SparseGPT calibrate on `--calib_rows` rows of `--calib_len` tokens packed from
`--calib_data` (default: the training split of the Python standard library), as
`jaxllm.quantize` does. `--bits` (SparseGPT only) quantizes the kept weights in the same pass
(the output is then also a quantized checkpoint, with quant.json). The directory is written
under a temporary name and renamed when complete; the last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags

from jaxllm.cli import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint to prune.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (must not exist or be empty).")
_METHOD = flags.DEFINE_enum("method", "sparsegpt", ["magnitude", "wanda", "sparsegpt"],
                            "Pruning method.")
_SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Fraction of each output's inputs pruned.")
_PATTERN = flags.DEFINE_string("pattern", None, "N:M semi-structured sparsity (e.g. 2:4: 2 "
                               "weights kept of every 4 consecutive inputs); overrides "
                               "--sparsity.")
_BITS = flags.DEFINE_enum("bits", "0", ["0", "4", "8"], "SparseGPT: also quantize the kept "
                          "weights to this many bits in the same pass (0: no).")
_GROUP = flags.DEFINE_integer("group_size", 128, "With --bits: rows per scale group.",
                              lower_bound=0)
_EXCLUDE = flags.DEFINE_list("exclude", [], "Params paths (regexes) kept dense, e.g. "
                             "blocks/mlp/down. Embeddings, norms, routers and the head always "
                             "are.")
_CALIB_DATA = flags.DEFINE_list("calib_data", [], "Calibration text files/dirs/globs "
                                "(default: the Python standard library).")
_CALIB_ROWS = flags.DEFINE_integer("calib_rows", 64, "Calibration rows.", lower_bound=1)
_CALIB_LEN = flags.DEFINE_integer("calib_len", 512, "Tokens per calibration row.",
                                  lower_bound=8)
_DAMP = flags.DEFINE_float("damp", 0.01, "SparseGPT: diagonal damping, a fraction of its mean.",
                           lower_bound=0.0)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_MESH = common.define_mesh_flag()
flags.mark_flags_as_required(["checkpoint", "out"])


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = common.empty_out_dir(_OUT.value)
  from jaxllm.quant import params as qparams
  from jaxllm.quant import pruning
  try:
    spec = pruning.PruneSpec(method=_METHOD.value, sparsity=_SPARSITY.value,
                             pattern=_PATTERN.value or "", exclude=tuple(_EXCLUDE.value),
                             bits=int(_BITS.value), group_size=_GROUP.value, damp=_DAMP.value)
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  common.initialize_distributed()
  import jaxllm
  from jaxllm.checkpoint import convert
  from jaxllm.quant import calibrate

  if qparams.QuantSpec.load(os.path.abspath(_CHECKPOINT.value)) is not None:
    raise common.CommandError(f"{_CHECKPOINT.value} is quantized: prune the float checkpoint "
                              "(--bits prunes and quantizes in one pass)")
  model = jaxllm.load(_CHECKPOINT.value, mesh=_MESH.value, kv_head_copies=False)
  start = time.time()
  rows = None
  if spec.method != "magnitude":
    rows = calibrate.calibration_rows(model.tokenizer, paths=_CALIB_DATA.value,
                                      num_rows=_CALIB_ROWS.value, seq_len=_CALIB_LEN.value)
  try:
    params, spec = pruning.prune_model(model.graphdef, model.params, spec, rows,
                                       progress=_PROGRESS.value)
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  seconds = time.time() - start
  target = spec.pattern or f"{spec.sparsity:g}"
  common.write_model_dir(out, convert.Checkpoint(model.config, params, model.tokenizer, "jaxllm"),
                         f"{spec.method}-{target}",
                         [spec] + ([spec.quant_spec()] if spec.bits else []))
  import numpy as np
  layers = {p: float(np.mean(v)) for p, v in spec.measured.items()}
  for path, fraction in layers.items():
    print(f"{path}: {fraction:.4f} zeros (per layer {min(np.ravel(spec.measured[path])):.4f}-"
          f"{max(np.ravel(spec.measured[path])):.4f})")
  print(json.dumps({"method": spec.method, "target": target, "bits": spec.bits,
                    "sparsity_by_weight": layers, "seconds": round(seconds, 1), "out": out}))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
