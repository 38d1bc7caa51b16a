"""The router-collapse experiment on `experiments/tiny_moe.py`, and MoE vs dense at equal
active parameters (docs/moe.md's tables and tools/results/cpu-2026-11-30/moe_balance.png come
from here).

Five runs on the standard-library corpus, equal steps, batch and schedule:
  none      tiny_moe without balancing (moe_aux_loss 0, router_z_loss 0, no routing bias)
  aux       tiny_moe with the load-balancing loss (0.01) and router z-loss (0.001)
  bias      tiny_moe with auxiliary-loss-free balancing (routing bias, rate 0.001), no aux loss
            (these three with the raw top-2 softmax weights, norm_topk_prob off)
  aux_norm  aux with the top-k weights renormalised to sum 1 (tiny_moe's default, as Mixtral)
  dense     experiments/tiny.py: its d_ff of 768 equals tiny_moe's 2 active experts x 384
Each run's metrics.jsonl gives the expert-load entropy and max load (over the mean) per MoE
layer over training, and the held-out loss.

  python tools/moe_balance.py OUTDIR [--steps=600] [--runs=none,aux,bias,aux_norm,dense]
writes OUTDIR/<run>/ (workdirs), OUTDIR/moe_balance.json and OUTDIR/moe_balance.png. A run
whose workdir already holds a finished run of the same length is summarised, not retrained, so
an interrupted experiment resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

from experiments import tiny, tiny_moe
from jaxllm import config as config_lib
from jaxllm.train import loop

_RAW_TOPK = dict(norm_topk_prob=False)  # the top-k softmax weights as they are (Switch, Qwen2)
RUNS = {
    "none": (tiny_moe, dict(train=dict(moe_aux_loss=0.0, router_z_loss=0.0), model=_RAW_TOPK)),
    "aux": (tiny_moe, dict(train=dict(moe_aux_loss=0.01, router_z_loss=0.001), model=_RAW_TOPK)),
    "bias": (tiny_moe, dict(train=dict(moe_aux_loss=0.0, router_z_loss=0.001),
                            model=dict(_RAW_TOPK, router_bias_update_rate=0.001))),
    "aux_norm": (tiny_moe, dict(train=dict(moe_aux_loss=0.01, router_z_loss=0.001),
                                model=dict(norm_topk_prob=True))),
    "dense": (tiny, {}),
}


def _config(name: str, steps: int):
  module, overrides = RUNS[name]
  c = module.get_config()
  for section, values in overrides.items():
    c[section].update(values)
  c.train.update(steps=steps, eval_every=steps // 4, checkpoint_every=steps)
  c.name = f"{c.name}_{name}"
  return config_lib.from_config_dict(c)


def _read(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _finished(workdir: str, steps: int) -> float | None:
  """Seconds a finished run of `steps` steps took, or None when the workdir holds none."""
  path = os.path.join(workdir, "elapsed.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    done = json.load(f)
  return done["seconds"] if done["steps"] == steps else None


def summarise(name: str, workdir: str, seconds: float) -> dict:
  lines = _read(workdir)
  train = [r for r in lines if "loss" in r]
  evals = [r for r in lines if "eval_loss" in r]
  row = {"run": name, "eval_loss": evals[-1]["eval_loss"], "eval_ppl": evals[-1]["eval_ppl"],
         "train_loss": train[-1]["loss"], "seconds": round(seconds, 1),
         "eval_curve": [(r["step"], r["eval_loss"]) for r in evals]}
  if "moe_load_entropy" in train[-1]:
    curve = [(r["step"], r["moe_load_entropy"], r["moe_max_load"]) for r in train]
    row["curve"] = curve
    last = train[-1]
    row["entropy_final"] = sum(last["moe_load_entropy"]) / len(last["moe_load_entropy"])
    row["entropy_min_layer"] = min(last["moe_load_entropy"])
    row["max_load_final"] = max(last["moe_max_load"])
    row["load_final"] = last["moe_load"]
    row["max_entropy"] = math.log(len(last["moe_load"][0]))
  return row


def plot(rows: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4))
  for i, r in enumerate(rows):
    color = f"C{i}"  # one colour per run in every panel
    if "curve" in r:
      steps = [c[0] for c in r["curve"]]
      ax1.plot(steps, [sum(c[1]) / len(c[1]) for c in r["curve"]], color=color,
               label=f"{r['run']} (mean)")
      ax1.plot(steps, [min(c[1]) for c in r["curve"]], color=color, linestyle=":",
               label=f"{r['run']} (min)")
      ax2.plot(steps, [max(c[2]) for c in r["curve"]], color=color, label=r["run"])
    ax3.plot(*zip(*r["eval_curve"]), marker="o", color=color, label=r["run"])
  if any("max_entropy" in r for r in rows):
    ax1.axhline(next(r["max_entropy"] for r in rows if "max_entropy" in r), color="grey",
                linewidth=0.5, label="log E (balanced)")
  ax1.set(title="expert-load entropy over layers (nats)", xlabel="step")
  ax2.set(title="max expert load / mean (worst layer)", xlabel="step", yscale="log")
  ax3.set(title="held-out loss", xlabel="step")
  for ax in (ax1, ax2, ax3):
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("out")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--runs", default=",".join(RUNS))
  args = parser.parse_args()
  rows = []
  for name in args.runs.split(","):
    workdir = os.path.join(args.out, name)
    seconds = _finished(workdir, args.steps)
    if seconds is None:
      start = time.time()
      loop.train(_config(name, args.steps), workdir, progress=False)
      seconds = time.time() - start
      with open(os.path.join(workdir, "elapsed.json"), "w") as f:
        json.dump({"steps": args.steps, "seconds": seconds}, f)
    rows.append(summarise(name, workdir, seconds))
    print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("curve", "eval_curve",
                                                                     "load_final")}), flush=True)
  with open(os.path.join(args.out, "moe_balance.json"), "w") as f:
    json.dump(rows, f, indent=1)
  plot(rows, os.path.join(args.out, "moe_balance.png"))


if __name__ == "__main__":
  main()
