"""The documented snippets run, at toy sizes: every shell command and Python block in the code
fences of README.md and the docs pages (`helpers.documented_pages`: README first, then the
site's nav order), in one scratch directory, with placeholders filled (PATH, FILES, model.gguf)
and training shortened; the console block's mistakes give the errors it shows. What cannot run
here (installs, the suite itself, a server that runs until stopped, its client, a benchmark of
minutes, Cloud TPU VMs) is listed in NOT_RUN with the reason and the test that covers it; a
snippet that is neither run nor listed fails the test, as does a listed one no page shows.

Slow (about two minutes of subprocesses, 2026-12-06): runs in CI and with `pytest --slow`.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import REPO, documented_pages, lora_with_updates, tiny_model, xla_flags

# Every `python -m jaxllm.train` of a bash block trains this long (the documented runs take
# minutes); the model is the experiment's own.
TOY_TRAIN = ("--config.train.steps=2 --config.train.batch_size=2 --config.train.seq_len=32 "
             "--config.train.warmup_steps=1 --config.train.eval_every=2 "
             "--config.train.eval_batches=1 --config.train.checkpoint_every=2 "
             "--config.data.tokenizer_max_sentences=5000 --config.model.n_layers=2 --noprogress")
# Every `python -m jaxllm.sft`, `jaxllm.dpo` and `jaxllm.reward` tunes the tiny chat model this
# long.
TOY_SFT = ("--config.train.steps=2 --config.train.batch_size=2 --config.train.seq_len=64 "
           "--config.finetune.eval_generate=2 --noprogress")
# Every `python -m jaxllm.rl` takes one step of 2 x 2 short completions on it.
TOY_RL = ("--config.train.steps=1 --config.rl.prompts_per_step=2 --config.rl.group_size=2 "
          "--config.rl.max_new_tokens=4 --config.rl.eval_prompts=2 --noprogress")
# GPTQ and AWQ calibrate on 8 rows of 64 tokens (64 x 512 by default).
TOY_CALIBRATION = "--calib_rows=8 --calib_len=64"

# Commands (a prefix) and Python blocks (a line they contain) not run, and why.
NOT_RUN = {
    "pip install": "installs the package (CI's own install does)",
    "pytest": "the test suite itself",
    "python -m jaxllm.serve": "a server runs until stopped (tests/test_server.py starts one)",
    "python -m jaxllm.bench moe": "a benchmark of minutes (tests/test_bench.py, test_moe_parallel.py)",
    "lm_eval ": "lm-evaluation-harness against a running server (tests/test_lm_eval.py runs "
                "it on the same tasks, in CI's parity stage)",
    "from openai import OpenAI": "needs a running server (tests/test_openai_api.py drives one "
                                 "with this client)",
    "tpu_setup/": "creates, uses and deletes Cloud TPU VMs through gcloud (tests/test_tpu_setup.py "
                  "runs each script with --dry-run)",
}


def snippets(text: str) -> list[tuple[int, str, str]]:
  """(line in the page, "bash" | "console" | "python", code) for each bash command (lines joined
  at a trailing backslash, `&&` chains split, comments dropped), each console block and each
  Python block."""
  found = []
  for m in re.finditer(r"```([a-z]*)\n(.*?)```", text, re.S):
    lang, code = m.group(1), m.group(2)
    line = text.count("\n", 0, m.start()) + 2  # the code's first line
    if lang == "bash":
      for i, command in enumerate(code.split("\n")):
        if i and code.split("\n")[i - 1].endswith("\\"):
          continue  # joined to the line above
        rest = code.split("\n")[i:]
        while rest[0].endswith("\\") and len(rest) > 1:
          rest = [rest[0][:-1] + " " + rest[1]] + rest[2:]
        command = re.sub(r"\s+#.*", "", rest[0]).strip()
        found += [(line + i, "bash", " ".join(part.split())) for part in command.split("&&")
                  if part.strip()]
    elif lang in ("console", "python"):
      found.append((line, lang, code))
  return found


def not_run_reason(kind: str, code: str) -> str | None:
  for key, why in NOT_RUN.items():
    if (code.startswith(key) if kind == "bash" else key in code):
      return why
  return None


def toy(kind: str, code: str, chat_model: str) -> str:
  """The snippet as it runs here: placeholders filled (BASE: the tiny chat model, ADAPTER: an
  adapter made for it), training and fine-tuning shortened (24 synthetic examples), the kernels
  in the Pallas interpreter (the page shows a GPU/TPU call), the Python API on a model with a
  chat template (its last line needs one)."""
  if kind == "bash":
    code = code.replace("$(python -m jaxllm.fetch smollm2-135m)", chat_model)
    code = code.replace("=PATH", "=runs/tiny").replace("=FILES", "='docs/*.txt'")
    code = code.replace("=BASE", f"={chat_model}").replace("=ADAPTER", "=adapter")
    if code.startswith("python -m jaxllm.train"):
      code = f"{code} {TOY_TRAIN}"
    if code.startswith(("python -m jaxllm.sft", "python -m jaxllm.dpo",
                        "python -m jaxllm.reward")):
      code = f"{code} {TOY_SFT}"
    if code.startswith("python -m jaxllm.rl"):
      code = f"{code} {TOY_RL}"
    if code.startswith("python -m jaxllm.data instructions"):
      code = re.sub(r"--examples=\d+", "--examples=24", code)
    if code.startswith("python -m jaxllm.quantize") and "--method=" in code:
      code = f"{code} {TOY_CALIBRATION}"
  elif kind == "python":
    code = code.replace('jaxllm.load("runs/tiny")', f'jaxllm.load("{chat_model}")')
    code = code.replace('"BASE"', f'"{chat_model}"')
    code = code.replace("interpret=False", "interpret=True")
    code = code.replace("alibi_slopes=None)", "alibi_slopes=None, interpret=True)")
    code = code.replace("group_sizes)", "group_sizes, interpret=True)")
  return code


# Inputs the kernel blocks use: tiny arrays of the documented shapes.
KERNEL_INPUTS = """
import jax, jax.numpy as jnp
r = jax.random.normal
q, k, v = r(jax.random.key(0), (1, 16, 4, 64)), r(jax.random.key(1), (1, 16, 2, 64)), \\
    r(jax.random.key(2), (1, 16, 2, 64))
k_pages, v_pages = r(jax.random.key(3), (4, 16, 2, 64)), r(jax.random.key(4), (4, 16, 2, 64))
lengths, page_table = jnp.array([40]), jnp.array([[1, 3, 0]], jnp.int32)
x, w = r(jax.random.key(5), (32, 16)), r(jax.random.key(6), (2, 16, 16))
group_sizes = jnp.array([12, 20], jnp.int32)
"""


def _scratch(tmp_path, chat_model):
  """The directory the snippets run in: text files for docs/*.txt, a tiny GGUF for
  model.gguf, a LoRA adapter of the chat model for ADAPTER, the clone's experiments/ and
  examples/."""
  from jaxllm.model import transformer
  from tests.gguf_fixtures import write_llama_gguf
  import jax
  docs = tmp_path / "docs"
  docs.mkdir()
  for name in ("textwrap.py", "shlex.py"):  # 4 KB of each
    with open(os.path.join(os.path.dirname(os.__file__), name)) as f:
      (docs / f"{name}.txt").write_text(f.read(4096))
  cfg = tiny_model(vocab_size=64)
  _, params = transformer.split(transformer.create(cfg, 0))
  write_llama_gguf(tmp_path / "model.gguf", cfg, jax.device_get(params))
  (tmp_path / "experiments").symlink_to(os.path.join(REPO, "experiments"))
  (tmp_path / "examples").symlink_to(os.path.join(REPO, "examples"))
  import jaxllm
  from jaxllm.lora import adapters, peft_format
  base = jaxllm.load(chat_model)
  peft_format.save(str(tmp_path / "adapter"), lora_with_updates(
      base.params, adapters.LoraConfig(rank=2, targets=("q", "v"))), base.config)


def _run_bash(command: str, cwd) -> subprocess.CompletedProcess:
  env = {**os.environ, "XLA_FLAGS": xla_flags(devices=1),
         # `python` in a snippet is this interpreter (CI's venv is not activated).
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
  return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_documented_snippets_run_at_toy_sizes(tmp_path, monkeypatch, tiny_chat_model):
  found = [(f"{path} line {line}", kind, code) for path, text in documented_pages()
           for line, kind, code in snippets(text)]
  _scratch(tmp_path, tiny_chat_model)
  monkeypatch.chdir(tmp_path)
  ran, unused = [], set(NOT_RUN)
  for line, kind, code in found:
    reason = not_run_reason(kind, code)
    if reason is not None:
      unused -= {k for k in NOT_RUN if NOT_RUN[k] == reason}
      continue
    code = toy(kind, code, tiny_chat_model)
    where = f"{line}: {code[:200]}"
    if kind == "bash":
      proc = _run_bash(code, tmp_path)
      assert proc.returncode == 0, (where, proc.stderr[-1500:])
    elif kind == "console":
      for command, shown in re.findall(r"^\$ (.*)\n((?:[^$].*\n)*)", code, re.M):
        proc = _run_bash(command, tmp_path)
        # The console shows what the user sees: the command's last lines.
        out = (proc.stdout + proc.stderr).strip().splitlines()
        want = shown.strip().splitlines()
        assert out[-len(want):] == want, (where, command, proc.stderr[-1500:])
    else:
      scope = {}
      exec(compile(KERNEL_INPUTS if "import pallas_kernels" in code or "pk." in code else "",
                   "inputs", "exec"), scope)
      if "pk." in code and "import pallas_kernels" not in code:
        code = "import pallas_kernels as pk\n" + code
      try:
        exec(compile(code, line, "exec"), scope)
      except Exception as e:  # a readable failure naming the block
        raise AssertionError(f"{where}: {type(e).__name__}: {e}") from e
      if "jaxllm.load" in code:
        assert isinstance(scope["m"].generate("def f(x):", max_tokens=4, temperature=0), str)
      if "pk.flash_attention" in code:
        assert np.isfinite(np.asarray(scope["out"])).all()
    ran.append(line)
  assert not unused, f"NOT_RUN names what no page shows any more: {sorted(unused)}"
  # The chain the pages imply: the default run's workdir, both converts, the quantized copies.
  for path in ("runs/tiny/config.json", "runs/tiny_moe/config.json", "out_hf/config.json",
               "out_jax", "q8", "q4", "q4g", "q4a", "merged/config.json", "my_adapter",
               "runs/grpo/adapter", "reward-hf/config.json"):
    assert (tmp_path / path).exists(), path
  assert len(ran) >= 22, ran


def test_snippets_are_found_split_and_classified():
  text = ("```bash\npip install -e . && python -m jaxllm.train   # train\n"
          "python -m jaxllm.eval --checkpoint=PATH \\\n    --data=FILES\n```\n"
          "```console\n$ jaxllm x\nerror: y\n```\n```python\nfrom openai import OpenAI\n```\n")
  found = snippets(text)
  assert [(kind, code) for _, kind, code in found] == [
      ("bash", "pip install -e ."), ("bash", "python -m jaxllm.train"),
      ("bash", "python -m jaxllm.eval --checkpoint=PATH --data=FILES"),
      ("console", "$ jaxllm x\nerror: y\n"), ("python", "from openai import OpenAI\n")]
  assert [line for line, _, _ in found] == [2, 2, 3, 7, 11]
  assert [not_run_reason(k, c) is None for _, k, c in found] == [False, True, True, True, False]
  assert toy("bash", "python -m jaxllm.eval --checkpoint=PATH --data=FILES", "M") == (
      "python -m jaxllm.eval --checkpoint=runs/tiny --data='docs/*.txt'")
  assert toy("bash", "python -m jaxllm.train", "M").endswith(TOY_TRAIN)
