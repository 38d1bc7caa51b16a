"""`python -m jaxllm.quantize --checkpoint=PATH --method=rtn|gptq|awq --bits=8|4 --out=DIR
[--head_bits=8|4]`

Reads any checkpoint `jaxllm.load` reads and writes a quantized jaxllm directory (config,
tokenizer, quant.json, orbax params) that `jaxllm.load`, generate, serve and eval accept.
GPTQ and AWQ calibrate on `--calib_rows` rows of `--calib_len` tokens packed from
`--calib_data` (default: the training split of the Python standard library). The directory
is written under a temporary name and renamed when complete, so a failed run leaves nothing
half-written; the last stdout line is one JSON object with the sizes.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

from jaxllm.cli import common

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Checkpoint to quantize.")
_OUT = flags.DEFINE_string("out", None, "Directory to write (must not exist or be empty).")
_METHOD = flags.DEFINE_enum("method", "rtn", ["rtn", "gptq", "awq"], "Quantization method.")
_BITS = flags.DEFINE_enum("bits", "8", ["8", "4"], "Bits per weight.")
_GROUP = flags.DEFINE_integer("group_size", None, "Rows per scale group (0: per output "
                              "channel). Default: 0 for int8, 128 for int4.", lower_bound=0)
_SYMMETRIC = flags.DEFINE_bool("symmetric", True, "Symmetric (no zero points).")
_CLIP = flags.DEFINE_bool("clip_search", False, "Shrink each group's range to the clipping of "
                          "least squared rounding error (a grid of 21 factors, 1.0 to 0.5).")
_EXCLUDE = flags.DEFINE_list("exclude", ["lm_head"], "Params paths (regexes) kept in full "
                             "precision, e.g. blocks/mlp/down. The embedding is unless "
                             "--head_bits.")
_HEAD_BITS = flags.DEFINE_enum("head_bits", "0", ["0", "8", "4"], "Also round the embedding "
                               "and LM head (tied or not) to nearest: 8 per vocab row, 4 in "
                               "groups of --head_group_size. 0 keeps them in float.")
_HEAD_GROUP = flags.DEFINE_integer("head_group_size", None, "Embedding columns per scale "
                                   "(0: one per row). Default: 0 for int8, 32 for int4.",
                                   lower_bound=0)
_CALIB_DATA = flags.DEFINE_list("calib_data", [], "Calibration text files/dirs/globs "
                                "(default: the Python standard library).")
_CALIB_ROWS = flags.DEFINE_integer("calib_rows", 64, "Calibration rows.", lower_bound=1)
_CALIB_LEN = flags.DEFINE_integer("calib_len", 512, "Tokens per calibration row.",
                                  lower_bound=8)
_ACT_ORDER = flags.DEFINE_bool("act_order", True, "GPTQ: quantize inputs with the largest "
                               "Hessian diagonal first.")
_DAMP = flags.DEFINE_float("damp", 0.01, "GPTQ: diagonal damping, a fraction of its mean.",
                           lower_bound=0.0)
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")
_MESH = common.define_mesh_flag()
flags.mark_flags_as_required(["checkpoint", "out"])


@common.one_line_errors
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  out = common.empty_out_dir(_OUT.value)
  bits = int(_BITS.value)
  group = _GROUP.value if _GROUP.value is not None else (0 if bits == 8 else 128)
  from jaxllm.quant import params as qparams
  try:
    spec = qparams.QuantSpec(bits=bits, group_size=group, symmetric=_SYMMETRIC.value,
                             method=_METHOD.value, exclude=tuple(_EXCLUDE.value),
                             clip_search=_CLIP.value, head_bits=int(_HEAD_BITS.value),
                             head_group_size=(_HEAD_GROUP.value if _HEAD_GROUP.value is not None
                                              else qparams.default_head_group(
                                                  int(_HEAD_BITS.value))))
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  common.initialize_distributed()
  import jaxllm
  from jaxllm.checkpoint import convert
  from jaxllm.quant import calibrate, disk_size, methods
  from jaxllm.quant import tensor as qtensor

  # On a mesh the model keeps its own KV heads: the checkpoint written is the model's.
  model = jaxllm.load(_CHECKPOINT.value, mesh=_MESH.value, kv_head_copies=False)
  if qparams.QuantSpec.load(os.path.abspath(_CHECKPOINT.value)) is not None:
    raise common.CommandError(f"{_CHECKPOINT.value} is already quantized")
  start = time.time()
  rows = None
  if spec.method != "rtn":
    rows = calibrate.calibration_rows(model.tokenizer, paths=_CALIB_DATA.value,
                                      num_rows=_CALIB_ROWS.value, seq_len=_CALIB_LEN.value)
  try:
    params, spec = methods.quantize_model(model.graphdef, model.params, spec, rows,
                                          act_order=_ACT_ORDER.value, damp=_DAMP.value,
                                          progress=_PROGRESS.value)
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  seconds = time.time() - start
  common.write_model_dir(out, convert.Checkpoint(model.config, params, model.tokenizer, "jaxllm"),
                         f"{spec.method}-int{bits}", [spec])
  report = {"method": spec.method, "bits": bits, "group_size": group,
            "head_bits": spec.head_bits, "head_group_size": spec.head_group_size,
            "symmetric": spec.symmetric, "quantized": list(spec.quantized),
            "memory_bytes_before": qtensor.tree_nbytes(model.params),
            "memory_bytes_after": qtensor.tree_nbytes(params),
            "disk_bytes_before": disk_size.dir_bytes(os.path.abspath(_CHECKPOINT.value)),
            "disk_bytes_after": disk_size.dir_bytes(out), "seconds": round(seconds, 1), "out": out}
  print(f"quantized {len(spec.quantized)} weight tensors ({spec.method}, int{bits}, "
        f"group {group or 'per-channel'}): weights in memory "
        f"{report['memory_bytes_before'] / 2**20:.1f} -> {report['memory_bytes_after'] / 2**20:.1f}"
        f" MiB, on disk {report['disk_bytes_after'] / 2**20:.1f} MiB, written to {out}")
  note = disk_size.larger_output_note(report["disk_bytes_before"], report["disk_bytes_after"], bits)
  if note:
    print(note, file=sys.stderr)
  print(json.dumps(report))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
