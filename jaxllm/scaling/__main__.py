"""`python -m jaxllm.scaling fit --runs=FILE.csv [--flops=1e21] [--bootstrap=100] [--plots=DIR]`

Fits Chinchilla's law L(N, D) = E + A / N^alpha + B / D^beta to measured runs (a CSV with
columns `params,tokens,loss`, and `flops` to group runs into IsoFLOP profiles), with bootstrap
intervals, beside the paper's published fit; prints the compute-optimal N and D for a budget
of `--flops`, and last one JSON line (`alpha`, `beta`, `E`, `A`, `B`, `tokens_per_param`, ...).
`--plots=DIR` writes loss against N per token budget, the IsoFLOP profiles and the fitted
compute-optimal frontier as PNG files (needs matplotlib). See `jaxllm.scaling.laws`.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import sys

from absl import app, flags

from jaxllm.cli import common

_RUNS = flags.DEFINE_string("runs", None, "CSV of runs: params,tokens,loss[,flops].")
_FLOPS = flags.DEFINE_float("flops", 1e21, "The training budget (FLOPs, 6 N D) to split "
                            "compute-optimally.", lower_bound=1.0)
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 100, "Bootstrap resamplings for the intervals "
                                  "(0: none).", lower_bound=0)
_PLOTS = flags.DEFINE_string("plots", None, "Directory for PNG plots (needs matplotlib).")

# Hoffmann et al. 2022, approach 3 (their Table A3 / equation 10).
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def read_runs(path: str) -> dict[str, list[float]]:
  """Columns params, tokens, loss (and flops when present) of a CSV file, as floats."""
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except OSError as e:
    raise common.CommandError(f"--runs={path}: {e.strerror}") from None
  missing = {"params", "tokens", "loss"} - set(rows[0] if rows else ())
  if not rows or missing:
    raise common.CommandError(f"--runs={path} needs the columns params,tokens,loss"
                              + (f" (missing: {', '.join(sorted(missing))})" if rows else
                                 " and at least one run"))
  columns = ("params", "tokens", "loss") + (("flops",) if "flops" in rows[0] else ())
  runs = {c: [] for c in columns}
  for line, row in enumerate(rows, start=2):
    for c in columns:
      try:
        value = float(row[c])
      except (TypeError, ValueError):
        raise common.CommandError(f"--runs={path} line {line}: {c}={row[c]!r} is not a "
                                  "number") from None
      if not value > 0 or not math.isfinite(value):
        raise common.CommandError(f"--runs={path} line {line}: {c}={row[c]} must be positive")
      runs[c].append(value)
  return runs


def _say(msg: str) -> None:
  print(msg, file=sys.stderr)


def fit_command(path: str, flops: float, bootstrap: int, plots: str | None) -> dict:
  from jaxllm.scaling import laws
  runs = read_runs(path)
  N, D, L = runs["params"], runs["tokens"], runs["loss"]
  try:
    fit = laws.fit_parametric(N, D, L)
  except ValueError as e:
    raise common.CommandError(str(e)) from None
  n_opt, d_opt = fit.compute_optimal(flops)
  result = {"runs": len(N), "alpha": fit.alpha, "beta": fit.beta, "E": fit.E, "A": fit.A,
            "B": fit.B, "flops": flops, "n_opt": n_opt, "d_opt": d_opt,
            "tokens_per_param": d_opt / n_opt}
  fits = laws.bootstrap_parametric(N, D, L, samples=bootstrap, start=fit) if bootstrap else []
  if fits:
    for key in ("alpha", "beta", "E", "A", "B"):
      result[f"{key}_90"] = laws.interval([getattr(f, key) for f in fits])
    result["tokens_per_param_90"] = laws.interval(
        [d / n for n, d in (f.compute_optimal(flops) for f in fits)])
  _say(f"{len(N)} runs: N {min(N):.3g} .. {max(N):.3g} params, D {min(D):.3g} .. {max(D):.3g} "
       f"tokens" + (f"; {len(fits)} bootstrap fits, 90% intervals" if fits else ""))
  for key, published in CHINCHILLA.items():
    band = result.get(f"{key}_90")
    _say(f"  {key:<6} {result[key]:10.4g}" + (f"  [{band[0]:.4g}, {band[1]:.4g}]" if band else "")
         + f"   Chinchilla {published:g}")
  _say(f"compute-optimal at {flops:.3g} FLOPs: N {n_opt:.4g} params, D {d_opt:.4g} tokens, "
       f"{d_opt / n_opt:.1f} tokens per parameter (Chinchilla's law: "
       f"{_chinchilla_tokens_per_param(flops):.1f})")
  iso = None
  if "flops" in runs:
    try:
      iso = laws.fit_isoflop(N, L, runs["flops"])
    except ValueError as e:
      _say(f"IsoFLOP profiles: {e}")
  if iso is not None:
    iso_n, iso_d = iso.compute_optimal(flops)
    result.update(isoflop_a=iso.a, isoflop_b=iso.b, isoflop_n_opt=iso_n, isoflop_d_opt=iso_d)
    _say(f"IsoFLOP minima ({len(iso.budgets)} budgets): N_opt ~ C^{iso.a:.3f}, D_opt ~ "
         f"C^{iso.b:.3f}; at {flops:.3g} FLOPs N {iso_n:.4g}, D {iso_d:.4g} "
         f"({iso_d / iso_n:.1f} tokens per parameter)")
  if plots:
    from jaxllm.scaling import plots as plots_lib
    for written in plots_lib.write(plots, runs, fit, iso):
      _say(f"plot: {written}")
  return result


def _chinchilla_tokens_per_param(flops: float) -> float:
  from jaxllm.scaling import laws
  n, d = laws.ParametricFit(objective=0.0, **CHINCHILLA).compute_optimal(flops)
  return d / n


@common.one_line_errors
def main(argv):
  common.positional(argv, "command", ("fit",))
  if not _RUNS.value:
    raise app.UsageError("fit needs --runs=FILE.csv (columns params,tokens,loss[,flops])")
  if _PLOTS.value:
    if importlib.util.find_spec("matplotlib") is None:
      raise common.CommandError("--plots needs matplotlib (pip install 'jaxllm[plots]')")
    os.makedirs(_PLOTS.value, exist_ok=True)
  result = fit_command(_RUNS.value, _FLOPS.value, _BOOTSTRAP.value, _PLOTS.value)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
