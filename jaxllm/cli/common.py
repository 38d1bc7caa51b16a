"""Flags and error handling shared by every entry point (absl apps)."""

from __future__ import annotations

import functools
import json
import os
import re
import sys

from absl import app, flags, logging

from jaxllm.errors import UserError

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-host runs "
    "(discovered automatically on Cloud TPU VMs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in the run.")


def define_keep_freed_memory_flag():
  """`--keep_freed_memory` of the entry points whose work is many large XLA:CPU steps (train,
  distill, bench); its main calls `keep_freed_memory` first. Not for serving: there it keeps
  the model loading's peak resident (SmolLM2-135M's server: 2.17 -> 2.82 GB) for steps whose
  temporaries are small."""
  return flags.DEFINE_bool(
      "keep_freed_memory", True, "On a CPU-only Linux host, keep freed memory in the process "
      "(glibc malloc: one arena, no mmap, no trimming), so that XLA:CPU does not fault its "
      "per-step temporaries in anew every step: faster steps, a larger resident set "
      "(jaxllm.cli.host_allocator).")


def keep_freed_memory(holder) -> None:
  """Sets the host allocator per a `define_keep_freed_memory_flag` flag: call it before any
  JAX work (JAX's threads keep the arenas they started with)."""
  if holder.value:
    from jaxllm.cli import host_allocator
    host_allocator.keep_freed_memory()


def define_mesh_flag():
  """`--mesh` of the inference and fine-tuning entry points (generate, eval, serve, sft,
  dpo)."""
  return flags.DEFINE_string(
      "mesh", None, "Devices to split the model over: AXIS=N,... with AXIS data, fsdp, tensor "
      "or expert (e.g. tensor=4 or data=2,tensor=4; unnamed axes 1). Default: one device.")


def define_adapter_flag():
  """`--adapter` of the inference entry points (generate, eval, serve)."""
  return flags.DEFINE_string(
      "adapter", None, "A LoRA adapter directory in PEFT's format (adapter_config.json + "
      "adapter_model.safetensors, ours or PEFT's) applied to --checkpoint, unmerged.")


def initialize_distributed() -> None:
  from jaxllm.parallel.mesh import initialize_distributed as init
  init(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def default_experiment(name: str = "tiny") -> str:
  """experiments/<name>.py in the working directory if there, else the installed copy."""
  local = os.path.join("experiments", f"{name}.py")
  if os.path.exists(local):
    return local
  import experiments
  return os.path.join(os.path.dirname(experiments.__file__), f"{name}.py")


class CommandError(UserError, RuntimeError):
  """A failure an entry point reports in one line (exit status 2)."""


def user_errors():
  """Error types that are the user's input, printed as one line instead of a traceback: every
  `jaxllm.errors.UserError` (each layer's own subclass) and a missing file."""
  return (UserError, FileNotFoundError)


def one_line_errors(main):
  """Wraps an absl main: quiet library logs, and user errors exit 2 with a one-line message."""
  @functools.wraps(main)
  def wrapped(argv):
    if not flags.FLAGS["verbosity"].present:
      # orbax logs every file it writes at INFO; keep the terminal for the progress bar.
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except user_errors() as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except app.UsageError as e:  # absl would print the whole help after it
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  return wrapped


def positional(argv: list[str], what: str, choices=()) -> str:
  """The one positional argument of an absl main (`what`: "suite", "model", ...), or a
  UsageError that says what is wrong: missing, more than one, or not one of `choices`."""
  args, listing = argv[1:], f" (one of: {', '.join(choices)})" if choices else ""
  if not args:
    raise app.UsageError(f"missing the {what}{listing}")
  if len(args) > 1:
    raise app.UsageError(f"one {what} expected, got: {' '.join(args)}")
  if choices and args[0] not in choices:
    raise app.UsageError(f"unknown {what} {args[0]!r}{listing}")
  return args[0]


_HELP_FLAGS = ("-h", "-?", "--help", "-help", "--helpshort", "-helpshort")
# absl module under which renamed flags' old spellings register: `command_help` lists them
# apart, and `parse_flags` notes each one used.
OLD_SPELLINGS = "jaxllm.cli.old_spellings"


def define_old_spelling(old: str, new: str) -> None:
  """Keeps `--old` working for the flag now called `--new` (one vocabulary across commands:
  --checkpoint, --out, --data, --max_seq_len, --speculative_k, --draft); a run that uses it is
  told the new name in one line."""
  flags.DEFINE_alias(old, new, module_name=OLD_SPELLINGS)
  flags.FLAGS[old].help = f"old spelling of --{new}"


def _renamed_to(flag) -> str:
  return flag.help.rpartition(" ")[2]


def command_help() -> str:
  """The running command's help: its docstring, its own flags, then the shared ones it
  defines (config, mesh, multi-host, host memory); absl's own flags stay in --helpfull."""
  def section(title: str, text: str) -> str:
    lines = text.strip().splitlines()[1:]  # absl heads each module's flags with its path
    return f"{title}:\n" + "\n".join(lines) if lines else ""

  main = sys.modules["__main__"]
  old = ", ".join(f"--{f.name} ({_renamed_to(f)})"
                  for f in flags.FLAGS.get_flags_for_module(OLD_SPELLINGS))
  # Shared flags: this module's, and those of the jaxllm.cli modules that define a family of
  # commands' flags (cli.finetune: sft and dpo).
  shared = [__name__] + sorted(m for m in flags.FLAGS.flags_by_module_dict()
                               if m.startswith("jaxllm.cli.") and m not in (__name__,
                                                                            OLD_SPELLINGS))
  parts = [(main.__doc__ or "").strip(), section("flags", flags.FLAGS.main_module_help()),
           *[section("shared flags", flags.FLAGS.module_help(m)) for m in shared],
           f"old spellings, still accepted: {old}" if old else "",
           "absl's own flags (logging, verbosity, ...): --helpfull"]
  return "\n\n".join(p for p in parts if p) + "\n"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing whose errors (bad flag, bad config file or key) are one line, exit 2;
  `--help` prints `command_help()` and exits 0."""
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    sys.stdout.write(command_help())
    sys.exit(0)
  try:
    rest = flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    # "Error whilst parsing config file:" is followed by a traceback whose last line is the cause.
    message = f"{lines[0]} {lines[-1]}" if len(lines) > 1 and lines[0].endswith(":") else (
        lines or [""])[0]
    print(f"error: {message or type(e).__name__}", file=sys.stderr)
    sys.exit(2)
  for flag in flags.FLAGS.get_flags_for_module(OLD_SPELLINGS):
    if flag.present:
      print(f"note: --{flag.name} is now {_renamed_to(flag)} (the old spelling still works)",
            file=sys.stderr)
  return rest


def define_config_flag(default_experiment: str):
  """`--config=FILE` plus `--config.key=value` overrides, with one-line errors.

  ml_collections applies overrides while the flag is defined (at import), so a misspelt key
  raises there rather than in `parse_flags`.
  """
  from ml_collections import config_flags
  flags.DEFINE_bool("show_config", False, "Print the resolved config (every key, its value and "
                    "what it means) and exit.")
  try:
    return config_flags.DEFINE_config_file(
        "config", default_experiment, "Experiment file (get_config() -> ConfigDict); "
        "override keys with --config.section.key=value.", lock_config=True)
  except (AttributeError, KeyError) as e:
    # ml_collections nests reprs: "'\\'foo\\'\\nDid you mean ...'"; keep the key alone.
    key = re.split(r"\\n|\n", str(e))[0].replace("\\", "").strip("\"' ")
    print(f"error: unknown config key {key!r} in a --config.* flag", file=sys.stderr)
  except (OSError, ValueError, TypeError, SyntaxError) as e:
    print(f"error: cannot load the experiment config: {str(e).strip().splitlines()[0]}",
          file=sys.stderr)
  sys.exit(2)


def config_value(holder):
  """The ConfigDict of a `define_config_flag` flag; a missing or broken file is a ConfigError."""
  from ml_collections import config_flags
  from jaxllm.config import ConfigError
  try:
    value = holder.value
    value.to_dict()  # a config that failed to load raises on first use, not on `.value`
    return value
  except OSError:
    path = config_flags.get_config_filename(flags.FLAGS[holder.name])
    raise ConfigError(f"cannot load experiment file {path!r} (missing, or no get_config())"
                      ) from None


def experiment(holder):
  """The validated `config.Config` of a `define_config_flag` flag (ConfigError if invalid);
  under `--show_config` it is printed, key by key with their meanings, and the command exits."""
  from jaxllm import config as config_lib
  cfg = config_lib.from_config_dict(config_value(holder))
  if flags.FLAGS.show_config:
    from jaxllm.cli import show_config
    sys.stdout.write(show_config.describe(cfg))
    sys.exit(0)
  return cfg


def empty_out_dir(value: str) -> str:
  """The absolute path of an `--out` directory that must not exist or be empty."""
  out = os.path.abspath(value)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise CommandError(f"--out={value} exists and is not empty (nothing written)")
  return out


def write_model_dir(out: str, checkpoint, name: str, specs=()) -> None:
  """Writes `checkpoint` (`convert.Checkpoint`) as a jaxllm directory at `out` (checked by
  `empty_out_dir`), each of `specs` saving its file beside it (`.save(directory)`): under a
  temporary name, renamed when complete, so a failed run leaves nothing half-written."""
  import shutil

  from jaxllm.checkpoint import convert
  tmp = f"{out}.partial-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    convert.export_orbax(checkpoint, tmp, name=name)
    for spec in specs:
      spec.save(tmp)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked by empty_out_dir)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def finish_training(result: dict, workdir: str) -> None:
  """Prints a training run's summary as one JSON line (every command ends with one), or how to
  resume one stopped by a signal (and exits 128 + the signal, as the shell does)."""
  if result["preempted_by"] is not None:
    print(f"stopped by signal {result['preempted_by']} after step {result['step']}; "
          f"checkpoint step {result['checkpoint_step']} saved in {workdir}; "
          "run the same command to resume", file=sys.stderr)
    sys.exit(128 + result["preempted_by"])
  summary = {k: v for k, v in result.items() if k != "params"}
  # Metrics may be numpy scalars.
  print(json.dumps(summary, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
