"""`python -m jaxllm.bench train` prints a table, or one JSON object with --json."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.ops import cpu_gemv
from pallas_kernels.flash_attention import mosaic_gpu
from tests.helpers import REPO, xla_flags

SMALL = ["--config.model.d_model=32", "--config.model.n_layers=2", "--config.model.head_dim=8",
         "--config.model.d_ff=64", "--config.model.vocab_size=256", "--config.train.seq_len=32",
         "--config.train.batch_size=4", "--steps=2"]


def _run(*args, devices=1, timeout=300):
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
  return subprocess.run([sys.executable, "-m", "jaxllm.bench", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_bench_train_json(tmp_path):
  out = tmp_path / "bench.json"
  proc = _run("train", "--json", f"--out={out}", *SMALL)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == json.loads(out.read_text())
  assert result["suite"] == "train" and result["batch_size"] == 4 and result["seq_len"] == 32
  assert result["step_s"] > 0 and result["compile_s"] > 0
  assert abs(result["tokens_per_s"] - 4 * 32 / result["step_s"]) < 1e-6 * result["tokens_per_s"]
  assert 0 < result["mfu_vs_matmul_peer"] < 5
  assert result["mfu_vs_datasheet"] is None  # CPUs have no data-sheet peak


def test_bench_checkpoint_json():
  """Every save mode timed in every round, both restore tiers, nothing left on disk."""
  proc = _run("checkpoint", "--json", *SMALL, "--save_every=1", "--repeats=2")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["suite"] == "checkpoint" and result["rounds"] == 2 and result["steps"] == 2
  assert {m: len(t) for m, t in result["seconds_all"].items()} == {"none": 2, "sync": 2,
                                                                    "async": 2}
  assert set(result["overhead"]) == set(result["save_blocking_s"]) == {"sync", "async"}
  assert set(result["restore_s"]) == {"disk", "ram"} and min(result["restore_s"].values()) > 0
  # about the parameters and both Adam moments in float32 (orbax's chunk encoding and metadata
  # make it somewhat smaller or larger)
  assert 0.5 < result["checkpoint_bytes"] / (3 * 4 * result["params"]) < 2
  assert not [f for f in os.listdir(REPO) if f.startswith("jaxllm-bench-ckpt-")]


def test_bench_table_and_usage():
  proc = _run("train", *SMALL)
  assert proc.returncode == 0, proc.stderr
  assert "tokens/s" in proc.stdout and "MFU vs matmul peer" in proc.stdout
  bad = _run("nonsense")
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: unknown suite 'nonsense' (one of: train, attention,"), bad.stderr


def test_bench_attention_json_on_cpu(tmp_path):
  """The suite's plumbing on CPU (kernels interpreted): every peer measured or its error noted,
  ratios computed, and our temporaries flat per token while XLA's grow with the sequence."""
  proc = _run("attention", "--json", "--seq_lens=128,512", "--head_dims=64", "--causal=true",
              "--tokens=512", "--width=128", "--repeats=1")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["suite"] == "attention" and result["interpret"] is True
  short, long = result["rows"]
  assert (short["seq_len"], short["batch"], long["seq_len"], long["batch"]) == (128, 4, 512, 1)
  for row in (short, long):
    for mode in ("fwd", "fwd_bwd"):
      assert row[f"ours_{mode}_tflops"] > 0 and row[f"xla_{mode}_tflops"] > 0
      assert row[f"jax_pallas_{mode}_tflops"] > 0
      assert row[f"ours_vs_jax_pallas_{mode}"] == (row[f"ours_{mode}_tflops"]
                                                   / row[f"jax_pallas_{mode}_tflops"])
      # Our Mosaic GPU forward runs in Mosaic GPU's interpreter where jax has one (>= 0.11).
      if mosaic_gpu.interpreter_available():
        assert row[f"ours_mgpu_{mode}_tflops"] > 0
      else:
        assert "interpreter" in row["errors"][f"ours_mgpu_{mode}"]
      for gpu_only in ("cudnn", "jax_pallas_mgpu"):
        assert row[f"{gpu_only}_{mode}_tflops"] is None and f"{gpu_only}_{mode}" in row["errors"]
  # Same tokens per problem: flash memory stays flat, materialised scores grow ~T.
  assert long["ours_fwd_bwd_temp_bytes"] < 1.5 * short["ours_fwd_bwd_temp_bytes"]
  assert long["xla_fwd_bwd_temp_bytes"] > 2 * short["xla_fwd_bwd_temp_bytes"]
  bad = _run("attention", "--peers=ours,flashier")
  assert bad.returncode == 2 and "unknown ['flashier']" in bad.stderr


def test_bench_pipeline_json():
  proc = _run("pipeline", "--json", "--stages=2", "--repeats=1", "--pipeline_memory=2,8",
              *SMALL[:-1], devices=2)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  rows = result["rows"]
  assert [(r["stages"], r["microbatches"]) for r in rows] == [(2, 1), (2, 2), (2, 4), (2, 8)]
  assert [r["formula_bubble"] for r in rows] == [1 / 2, 1 / 3, 1 / 5, 1 / 9]
  # The measured bubble is the linear fit's reading of the step times; its value is timing
  # (a noisy CPU can fit a negative slope), so only its consistency is asserted.
  steps = np.asarray([r["step_s"] for r in rows])
  assert (steps > 0).all()
  tau, _ = np.polyfit([r["microbatches"] for r in rows], steps, 1)
  np.testing.assert_allclose([r["measured_bubble"] for r in rows],
                             [1 - r["microbatches"] * tau / r["step_s"] for r in rows], rtol=1e-6)
  # Two layers cannot make 2 stages x 2 circular chunks: GPipe and 1F1B only.
  memory = {(r["schedule"], r["microbatches"]): r["temp_bytes"] for r in result["memory"]}
  assert sorted(memory) == [("1f1b", 2), ("1f1b", 8), ("gpipe", 2), ("gpipe", 8)]
  assert memory["gpipe", 8] - memory["gpipe", 2] > 2 * (memory["1f1b", 8] - memory["1f1b", 2])


def test_bench_decode_json(tiny_chat_model):
  """The decode suite's plumbing at toy sizes (a tiny random model with SmolLM2's tokenizer;
  the bench on the real model is docs/quantization.md's): every peer measured, ratios consistent,
  speculative output identical to plain greedy, compile counts reported."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  proc = _run("decode", "--json", f"--checkpoint={tiny_chat_model}", "--batches=1,2",
              "--prompt_tokens=12", "--new_tokens=6",
              "--decode_peers=jaxllm_fp32,jaxllm_int4,transformers,llama_cpp",
              "--drafts=ngram:2,layer_skip:1,int4",
              "--speculative_k=2", "--repeats=1")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["suite"] == "decode" and result["new_tokens"] == 6
  rows = {(r["peer"], r["batch"]): r for r in result["rows"]}
  # llama.cpp is an optional peer (batch 1, GGUF files only): with llama-cpp-python installed
  # it refuses this Hugging Face directory; without, it says what to install.
  assert ("pip install llama-cpp-python" in result["errors"]["llama_cpp"]
          or result["errors"]["llama_cpp"] == "needs a GGUF checkpoint")
  assert set(rows) == {(p, b) for p in ("jaxllm_fp32", "jaxllm_int4", "transformers")
                       for b in (1, 2)}
  for (peer, batch), r in rows.items():
    assert abs(r["tokens_per_s"] - batch * 6 / r["seconds"]) < 1e-6 * r["tokens_per_s"]
    assert r["decode_tokens_per_s"] > 0 and 0 < r["prefill_seconds"]
    assert r["vs_transformers"] == r["tokens_per_s"] / rows["transformers", batch]["tokens_per_s"]
    assert (r["bandwidth_fraction"] > 0) if batch == 1 else r["bandwidth_fraction"] is None
  # Bytes per token: the float32 weights (the tied [49152, 96] table is 18.9 MB of 19.5) plus
  # the live K/V; int4 blocks with the int8 tied table read about a quarter.
  fp32, int4 = rows["jaxllm_fp32", 1]["bytes_per_token"], rows["jaxllm_int4", 1]["bytes_per_token"]
  assert 49152 * 96 * 4 < fp32 < 49152 * 96 * 4 * 1.1 and 0.25 * fp32 < int4 < 0.3 * fp32, (
      fp32, int4)
  assert result["copy_bandwidth_gbps"] > 0
  # The subprocess has one CPU device: the kernel decodes (where it can be built), and changes
  # no token.
  if cpu_gemv.available():
    assert result["greedy_matches_xla_path"] == {"jaxllm_fp32": True, "jaxllm_int4": True}
  # Same weights, same prompts, greedy: the same tokens as transformers.
  assert result["greedy_matches_transformers"] == {"1": True, "2": True}
  assert [s["draft"] for s in result["speculative"]] == ["ngram:2", "layer_skip:1", "int4"]
  assert all(s["identical"] and 0 <= s["acceptance_rate"] <= 1 for s in result["speculative"])
  assert result["compiles"]["decode_loop"] >= 1
  bad = _run("decode", "--decode_peers=vllm")
  assert bad.returncode == 2 and "unknown ['vllm']" in bad.stderr


def test_bench_serve_json(tiny_chat_model):
  """The serve suite's plumbing at toy sizes (a tiny random model with SmolLM2's tokenizer):
  every mode measured over the same requests, utilisation a fraction, prefix caching reuses
  the shared pages and changes no output, nor do zero-initialised adapters (multi-LoRA),
  grammar-checked proposals or prompt tokens riding in the decode steps (mixed steps)."""
  # 10 prefix requests arriving together: the first computes the 256 shared tokens, the other
  # 9 wait for its pages and reuse them.
  proc = _run("serve", "--json", f"--checkpoint={tiny_chat_model}", "--requests=6", "--rate=50",
              "--max_output_tokens=64", "--prefix_requests=10", "--lora_adapters=2",
              "--lora_rank=4", "--long_prompt_tokens=96", timeout=900)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["max_output_tokens"] == 64
  cont, static = result["rows"]["continuous"], result["rows"]["static"]
  assert cont["output_tokens"] == static["output_tokens"] > 0
  assert result["continuous_vs_static"] == cont["tokens_per_s"] / static["tokens_per_s"]
  assert 0.5 < cont["kv_utilisation"] <= 1.0
  assert 0 <= cont["ttft_p50"] <= cont["ttft_p99"]
  prefix = result["prefix"]
  assert prefix["identical"] and prefix["prefix_hit_tokens"] == 9 * 256
  over, lock = result["rows"]["overlapped"], result["rows"]["lockstep"]
  assert over["identical"] and lock["output_tokens"] == over["output_tokens"]  # speed only
  assert cont["mode"] == "lockstep" and cont["seconds"] == lock["seconds"]  # the CPU's default
  # The step breakdown in ms per decode step: each second in at most one part, so the parts
  # never add up to more than the wall time (`other`, what no part holds, is not negative).
  for row in (over, lock):
    parts = row["step_parts_ms"]
    assert set(parts) == {"admit", "prefill", "schedule", "dispatch", "wait", "emit", "other"}
    assert all(v >= 0 for v in parts.values()) and parts["wait"] > 0 and parts["emit"] > 0
  raw = result["rows"]["raw"]  # the offline loop at the engine's batch, the same weights
  assert raw["batch"] == result["max_slots"] and raw["tokens_per_s"] > 0
  assert cont["vs_raw"] == cont["tokens_per_s"] / raw["tokens_per_s"]
  assert raw["with_prefill_tokens_per_s"] > 0
  spec = result["rows"]["speculative"]  # greedy: proposals change the speed, not the tokens
  assert spec["identical"] and spec["output_tokens"] == cont["output_tokens"]
  assert 0 <= spec["acceptance"] <= 1
  multi = result["rows"]["multi_lora"]  # zero-initialised adapters: the base's tokens
  assert multi["identical"] and multi["output_tokens"] == cont["output_tokens"]
  assert multi["adapters"] == 2 and multi["vs_continuous"] > 0
  js = result["rows"]["structured"]  # under a schema no request can finish: the same lengths
  assert js["same_lengths"] and js["output_tokens"] == cont["output_tokens"]
  assert js["mask_ms_per_token"] > 0 and js["vs_lockstep"] > 0
  sjs = result["rows"]["structured_speculative"]  # grammar-checked proposals: same tokens
  assert sjs["identical"] and sjs["output_tokens"] == js["output_tokens"]
  assert 0 < sjs["grammar_acceptance"] <= 1 and sjs["vs_structured"] > 0
  mixed = result["interleaved"]  # prompts in the decode steps: other timing, same streams
  assert mixed["identical"] and mixed["separate"]["mixed_steps"] == 0
  assert mixed["mixed"]["mixed_steps"] > 0 and mixed["mixed"]["long_prompts"] >= 1
  assert 0 < mixed["mixed"]["itl_p50_ms"] <= mixed["mixed"]["itl_p99_ms"]
  bad = _run("serve", f"--checkpoint={tiny_chat_model}", "--weights=float32,fp8")
  assert bad.returncode == 2 and "weights ['fp8']" in bad.stderr


def test_decode_of_a_random_model_with_a_checkpoints_tokenizer(tiny_chat_model):
  """`--random_init`'s path: random weights of a config (vocabulary resized to the checkpoint's
  tokenizer, SmolLM2's), bf16 + int4 weights read per token as counted, non-jaxllm peers
  refused."""
  from jaxllm.bench import decode
  from tests.helpers import tiny_model
  result = decode.run(tiny_chat_model, batches=(1,),
                      peers=("jaxllm_fp32", "jaxllm_bf16_int4", "transformers"), drafts=(),
                      prompt_tokens=8, new_tokens=4, random_model_config=tiny_model(
                          d_model=64, head_dim=16, max_seq_len=64))
  rows = {r["peer"]: r for r in result["rows"]}
  assert set(rows) == {"jaxllm_fp32", "jaxllm_bf16_int4"}
  assert result["errors"] == {"transformers": "random weights: jaxllm peers only"}
  # Tied float32 table [49152, 64] plus 2 layers; int4 layers and an int8 table about 4x less.
  fp32, low = rows["jaxllm_fp32"]["bytes_per_token"], rows["jaxllm_bf16_int4"]["bytes_per_token"]
  assert 49152 * 64 * 4 < fp32 < 49152 * 64 * 4 * 1.1 and 0.25 * fp32 < low < 0.3 * fp32
  assert result["checkpoint"].startswith("random 3.") and all(
      0 < r["bandwidth_fraction"] for r in rows.values())
