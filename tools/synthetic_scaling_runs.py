"""Writes a CSV of synthetic runs for `python -m jaxllm.scaling fit`: IsoFLOP profiles at 1e15,
1e16 and 1e17 FLOPs (5 model sizes each, a decade either side of the optimum), losses from
Chinchilla's published law times a 0.3% lognormal error (seed 0).

usage: python tools/synthetic_scaling_runs.py OUT.csv
"""

import sys

import numpy as np

from jaxllm.scaling import laws

CHINCHILLA = laws.ParametricFit(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, objective=0.0)


def main(path: str) -> None:
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    f.write("params,tokens,loss,flops\n")
    for flops in (1e15, 1e16, 1e17):
      n_opt, _ = CHINCHILLA.compute_optimal(flops)
      for k in np.linspace(-1.0, 1.0, 5):
        n = n_opt * 10 ** k
        d = flops / (6 * n)
        loss = CHINCHILLA.loss(n, d) * np.exp(rng.normal(0, 0.003))
        f.write(f"{n:.6g},{d:.6g},{loss:.6g},{flops:g}\n")


if __name__ == "__main__":
  main(sys.argv[1])
