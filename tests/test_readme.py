"""The commands README.md and the docs pages show name only commands, flags and config keys
that exist (and no old spelling of a renamed flag): every `python -m jaxllm.X ...` / `jaxllm X
...` in their code blocks and inline code, against each command's `--help` and the config's
sections."""

import dataclasses
import functools
import os
import re
import subprocess
import sys

from jaxllm import config as config_lib
from jaxllm.cli import main as cli_main
from tests.helpers import REPO, documented_pages, xla_flags

# A command (python -m jaxllm.X or jaxllm X), then the rest of its line or code span.
_COMMAND = re.compile(r"(?:python -m jaxllm[. ]|(?<![\w/.])jaxllm )([a-z]+)\b([^`\n]*)")
_FLAG = re.compile(r"(?<![\w-])--(?:\[no\])?([a-z][a-z0-9_]*)")
_CONFIG_KEY = re.compile(r"--config\.([a-z_]+)\.([a-z_0-9]+)")


def readme_commands(text: str) -> list[tuple[str, str]]:
  """(command, its arguments) for every command the text shows, in fenced blocks (lines joined
  at a trailing backslash; a console block's command answered by an `error:` line is a
  deliberate mistake, left out) and in inline code."""
  found = []
  for lang, fence in re.findall(r"```([a-z]*)\n(.*?)```", text, re.S):
    lines = fence.replace("\\\n", " ").splitlines()
    for line, after in zip(lines, lines[1:] + [""]):
      if lang == "console" and after.startswith("error:"):
        continue
      found += _COMMAND.findall(line.split("  #")[0])
  prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
  for span in re.findall(r"`([^`]+)`", prose):
    found += _COMMAND.findall(span)
  return [(command, " ".join(args.split())) for command, args in found]


def problems(commands: list[tuple[str, str]], help_of) -> list[str]:
  """Commands, flags and config keys in `commands` that do not exist (`help_of(command)`: the
  command's --help text), and old spellings of renamed flags."""
  bad = sorted({c for c, _ in commands} - set(cli_main.COMMANDS))
  defaults = config_lib.Config("x", config_lib.ModelConfig(), config_lib.DataConfig(),
                               config_lib.TrainConfig(), config_lib.MeshConfig())
  keys = {s: {f.name for f in dataclasses.fields(getattr(defaults, s))}
          for s in ("model", "data", "train", "mesh", "distill")}
  # the fine-tuning commands' own sections (sft, dpo, reward, rl)
  keys.update({s: {f.name for f in dataclasses.fields(cls)} for s, cls in (
      ("finetune", config_lib.FinetuneConfig), ("lora", config_lib.AdapterConfig),
      ("dpo", config_lib.PreferenceConfig), ("rl", config_lib.RlConfig))})
  for command, args in commands:
    if command not in cli_main.COMMANDS:
      continue
    own, _, old = help_of(command).partition("old spellings, still accepted:")
    for flag in _FLAG.findall(args):
      if flag in ("help", "helpfull"):
        continue
      negated = flag.startswith("no") and f"--[no]{flag[2:]}:" in own  # absl's --noX
      if f"--{flag}:" not in own and f"--[no]{flag}:" not in own and not negated:
        bad.append(f"{command} --{flag}" + (" (an old spelling)" if f"--{flag} (" in old
                                            else ""))
    for section, key in _CONFIG_KEY.findall(args):
      if key not in keys.get(section, ()):
        bad.append(f"{command} --config.{section}.{key}")
  return sorted(set(bad))


def _help(command: str) -> str:
  module = cli_main.COMMANDS[command][0]
  proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=120,
                        env={**os.environ, "XLA_FLAGS": xla_flags(devices=1)})
  assert proc.returncode == 0, (command, proc.stderr[-500:])
  return proc.stdout


def test_documented_commands_use_flags_and_keys_that_exist():
  help_of, bad = functools.cache(_help), []
  everywhere = []
  for path, text in documented_pages():
    commands = readme_commands(text)
    everywhere += commands
    bad += [f"{path}: {p}" for p in problems(commands, help_of)]
  assert len(everywhere) > 40 and {c for c, _ in everywhere} >= {"train", "generate", "serve",
                                                                 "chat"}
  assert not bad, "the documented commands name what does not exist:\n" + "\n".join(bad)


def test_readme_commands_are_found_and_checked_where_the_readme_writes_them():
  text = ("```bash\npython -m jaxllm.generate --checkpoint=a \\\n    --nope=1   # --not_this\n```\n"
          "```console\n$ jaxllm train --config.train.bad=1\nerror: unknown config key\n```\n"
          "Inline: `jaxllm chat --stream --nostream --nonsense`, `jaxllm train --config.train.lr=1 "
          "--config.model.nope=2` and `python -m jaxllm.eval --max_len=3`; not `runs/jaxllm "
          "train --x`; `jaxllm trian`.\n")
  commands = readme_commands(text)
  assert commands == [("generate", "--checkpoint=a --nope=1"), ("chat", "--stream --nostream --nonsense"),
                      ("train", "--config.train.lr=1 --config.model.nope=2"),
                      ("eval", "--max_len=3"), ("trian", "")]
  helps = {"generate": "  --checkpoint: x\n", "chat": "  --[no]stream: x\n",
           "train": "  --config: x\n",
           "eval": "  --max_seq_len: x\nold spellings, still accepted: --max_len (--max_seq_len)"}
  assert problems(commands, helps.get) == [
      "chat --nonsense", "eval --max_len (an old spelling)", "generate --nope", "train --config.model.nope",
      "trian"]
