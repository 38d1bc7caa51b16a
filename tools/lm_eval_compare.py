"""lm-evaluation-harness against `python -m jaxllm.serve`, beside `python -m jaxllm.eval
--choices`, on the repository's tasks (examples/lm_eval/): one JSON object on stdout.

  python tools/lm_eval_compare.py [CHECKPOINT] [PORT]     (default: SmolLM2-135M, 8123)

Needs lm_eval[api] (the parity extra); run from the repository root.
"""

import json
import os
import subprocess
import sys
import time

import httpx
import lm_eval
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def task(name: str) -> dict:
  with open(os.path.join(REPO, "examples", "lm_eval", f"{name}.yaml")) as f:
    config = yaml.safe_load(f)
  config["dataset_kwargs"]["data_files"]["test"] = os.path.join(REPO, "examples", "lm_eval",
                                                                f"{name}.jsonl")
  return config


def main():
  checkpoint = sys.argv[1] if len(sys.argv) > 1 else subprocess.run(
      [sys.executable, "-m", "jaxllm.fetch", "smollm2-135m"], capture_output=True, text=True,
      check=True).stdout.strip().splitlines()[-1]
  port = int(sys.argv[2]) if len(sys.argv) > 2 else 8123
  server = subprocess.Popen([sys.executable, "-m", "jaxllm.serve", f"--checkpoint={checkpoint}",
                             f"--port={port}", "--max_slots=8", "--max_seq_len=512"], cwd=REPO,
                            stderr=subprocess.DEVNULL)
  base = f"http://127.0.0.1:{port}"
  try:
    for _ in range(600):
      try:
        if httpx.get(f"{base}/health").status_code == 200:
          break
      except httpx.HTTPError:
        pass
      time.sleep(1)
    name = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model={name},base_url={base}/v1/completions,tokenizer_backend=remote,"
                   "num_concurrent=8,max_retries=1",
        tasks=[task("choices"), task("answers")], log_samples=True)
    harness_s = time.perf_counter() - start
  finally:
    server.terminate()
    server.wait()
  start = time.perf_counter()
  ours = subprocess.run([sys.executable, "-m", "jaxllm.eval", f"--checkpoint={checkpoint}",
                         "--choices=examples/lm_eval/choices.jsonl"], cwd=REPO,
                        capture_output=True, text=True, check=True)
  eval_s = time.perf_counter() - start
  answers = sorted(results["samples"]["jaxllm_answers"], key=lambda s: s["doc_id"])
  print(json.dumps({
      "checkpoint": checkpoint, "harness": results["results"],
      "harness_seconds": round(harness_s, 1),
      "jaxllm_eval": json.loads(ours.stdout.strip().splitlines()[-1]),
      "jaxllm_eval_seconds": round(eval_s, 1),
      "answers": [s["resps"][0][0] for s in answers]}, indent=1))


if __name__ == "__main__":
  main()
