"""The reward curves of `jaxllm rl` runs as one PNG: per run, the mean reward of each step's
rollouts (thin) and its 5-step moving average (thick), and the held-out greedy reward where it
was measured (markers).

python tools/plot_rl.py OUT.png WORKDIR/metrics.jsonl [MORE/metrics.jsonl ...]
(needs matplotlib, which jaxllm does not depend on)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np


def main(out: str, paths: list[str]) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4))
  for path in paths:
    if not os.path.exists(path):
      continue
    rows = [json.loads(line) for line in open(path) if line.strip()]
    name = os.path.basename(os.path.dirname(path))
    steps = [r for r in rows if "reward_mean" in r]
    x = np.array([r["step"] for r in steps])
    y = np.array([r["reward_mean"] for r in steps])
    line, = ax.plot(x, y, lw=0.8, alpha=0.5)
    if len(y) >= 5:
      smooth = np.convolve(y, np.ones(5) / 5, mode="valid")
      ax.plot(x[4:], smooth, lw=2, color=line.get_color(), label=f"{name}: rollout reward")
    evals = [r for r in rows if "eval_reward_mean" in r]
    ax.plot([r["step"] for r in evals], [r["eval_reward_mean"] for r in evals], "o--",
            color=line.get_color(), label=f"{name}: held-out (greedy)")
  ax.set_xlabel("RL step")
  ax.set_ylabel("reward (fraction of correct answers)")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  print(out)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2:])
