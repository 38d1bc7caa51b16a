"""The package's layering: a lower layer never imports a higher one (function-level imports
included), no two modules import each other, only `jaxllm.ops` reaches the Pallas kernels, and
no test imports a command module (absl flags live in one registry per process: two commands'
--checkpoint clash).

  entry points (jaxllm/*.py, cli, bench, a package's __main__), planner
  rl (rollouts from inference, updates from train: the layer that joins them)
  inference      train
  checkpoint     data
  model          parallel
  ops            quant (tensor formats, and the algorithms that calibrate on the model),
                 lora (weight: beside the QTensor format; adapters; peft_format: above model)
  config         pallas_kernels
"""

import ast
import os

from tests.helpers import REPO

# (importing package, imported package): forbidden edges, by dotted prefix.
HIGHER = ("jaxllm.inference", "jaxllm.train", "jaxllm.bench", "jaxllm.cli", "jaxllm.api",
          "jaxllm.planner", "jaxllm.rl")
FORBIDDEN = [
    *[(low, high) for low in ("jaxllm.model", "jaxllm.ops", "jaxllm.quant", "jaxllm.parallel",
                              "jaxllm.checkpoint", "jaxllm.data", "jaxllm.config", "jaxllm.lora")
      for high in HIGHER],
    ("jaxllm.errors", "jaxllm"),  # the user-error base: every layer imports it
    # LoraWeight sits with the QTensor format (ops computes with it); the adapter walk above
    # quant, PEFT's files above the model.
    *[("jaxllm.lora.weight", low) for low in ("jaxllm.model", "jaxllm.ops", "jaxllm.quant")],
    ("jaxllm.lora.adapters", "jaxllm.model"), ("jaxllm.lora.adapters", "jaxllm.ops"),
    *[(low, "jaxllm.lora.adapters") for low in ("jaxllm.ops", "jaxllm.model", "jaxllm.quant")],
    *[(low, "jaxllm.lora.peft_format") for low in ("jaxllm.ops", "jaxllm.model", "jaxllm.quant")],
    ("jaxllm.ops", "jaxllm.model"), ("jaxllm.quant.tensor", "jaxllm.model"),
    ("jaxllm.quant.params", "jaxllm.model"), ("jaxllm.quant.tensor", "jaxllm.ops"),
    ("jaxllm.inference", "jaxllm.train"), ("jaxllm.train", "jaxllm.inference"),
    ("jaxllm.inference", "jaxllm.bench"), ("jaxllm.train", "jaxllm.bench"),
    ("jaxllm.inference", "jaxllm.planner"), ("jaxllm.train", "jaxllm.planner"),
    ("jaxllm.inference", "jaxllm.rl"), ("jaxllm.train", "jaxllm.rl"),
    *[("jaxllm.rl", high) for high in ("jaxllm.cli", "jaxllm.bench", "jaxllm.planner")],
]
ENTRY_POINTS = {"generate", "serve", "eval", "convert", "quantize", "prune", "distill", "sft",
                "dpo", "fetch", "plan"}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def _imports(path: str, module: str) -> set[str]:
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
        name = f"{base}.{node.module}" if node.module else base
      else:
        name = node.module
      # `from X import y`: the dependency is X.y (a module or a name in X).
      out.update(f"{name}.{a.name}" for a in node.names)
  return out


def _under(name: str, prefix: str) -> bool:
  return name == prefix or name.startswith(prefix + ".")


def test_no_layer_imports_a_higher_one():
  bad = []
  for root in ("jaxllm", "pallas_kernels"):
    for dirpath, _, files in os.walk(os.path.join(REPO, root)):
      for f in files:
        if not f.endswith(".py"):
          continue
        path = os.path.join(dirpath, f)
        module = _module_name(path)
        for name in _imports(path, module):
          # The entry points (jaxllm/generate.py, ...) are the top layer.
          if name.startswith("jaxllm.") and name.split(".")[1] in ENTRY_POINTS and (
              name.count(".") == 1) and not _under(module, "jaxllm.bench"):
            if module.split(".")[1] not in ENTRY_POINTS:
              bad.append(f"{module} imports the entry point {name}")
          for low, high in FORBIDDEN:
            # `python -m jaxllm.data` is an entry point that lives in its package.
            if module.endswith(".__main__") and _under(name, "jaxllm.cli"):
              continue
            if _under(module, low) and _under(name, high):
              bad.append(f"{module} imports {name}")
          # The benchmarks time the kernels as peers; the planner asks libtpu for topologies.
          if _under(name, "pallas_kernels") and not (
              _under(module, "jaxllm.ops") or _under(module, "pallas_kernels")
              or _under(module, "jaxllm.bench")
              or (_under(module, "jaxllm.planner") and _under(name, "pallas_kernels.backends"))):
            bad.append(f"{module} imports {name} (only jaxllm.ops runs kernels)")
  assert not bad, "\n".join(sorted(set(bad)))


def module_imports(path: str, module: str) -> set[str]:
  """The package modules (files) the module at `path` imports, function-level imports
  included; `from X import y` counts as X.y when y is a module, else as X."""
  found = set()
  for name in _imports(path, module):
    for candidate in (name, name.rpartition(".")[0]):
      if candidate.startswith(("jaxllm", "pallas_kernels")) and _module_file(candidate):
        found.add(candidate)
        break
  return found - {module}


def mutual_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
  """Pairs of modules that import each other (a package importing its own submodule through
  its __init__ counts only when the submodule imports the package back)."""
  return sorted((a, b) for a, deps in graph.items() for b in deps
                if a < b and a in graph.get(b, ()))


def test_no_two_modules_import_each_other():
  graph = {}
  for root in ("jaxllm", "pallas_kernels"):
    for dirpath, _, files in os.walk(os.path.join(REPO, root)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(dirpath, f)
          graph[_module_name(path)] = module_imports(path, _module_name(path))
  assert len(graph) > 100
  assert not mutual_imports(graph), mutual_imports(graph)


def test_a_mutual_import_is_caught(tmp_path):
  (tmp_path / "a.py").write_text("def f():\n  from jaxllm.ops import ring_attention\n")
  graph = {"jaxllm.ops.attention": module_imports(str(tmp_path / "a.py"), "jaxllm.ops.attention"),
           "jaxllm.ops.ring_attention": {"jaxllm.ops.attention", "jaxllm.config"}}
  assert mutual_imports(graph) == [("jaxllm.ops.attention", "jaxllm.ops.ring_attention")]


def _defines_flags(path: str) -> bool:
  """Whether importing the module at `path` defines absl flags (a `flags.DEFINE_*` or a
  `common.define_*_flag` call among its top-level statements)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for stmt in tree.body:
    for node in ast.walk(stmt):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and (
          node.func.attr.startswith("DEFINE")
          or (node.func.attr.startswith("define_") and node.func.attr.endswith("_flag"))):
        return True
  return False


def _module_file(name: str) -> str | None:
  base = os.path.join(REPO, *name.split("."))
  for path in (base + ".py", os.path.join(base, "__init__.py")):
    if os.path.isfile(path):
      return path
  return None


def command_imports(path: str) -> list[str]:
  """The modules that define absl flags which the file at `path` imports. Flags live in one
  process-wide registry, so a test that imports a command (`jaxllm.quantize`) clashes with
  another command imported by another test in the same pytest worker (both define
  --checkpoint): which tests share a worker changes from run to run."""
  found = []
  for name in _imports(path, "tests." + os.path.basename(path)[:-3]):
    # `from X import y` gives X.y: a module, or a name in the module X.
    for candidate in (name, name.rpartition(".")[0]):
      module_path = _module_file(candidate) if candidate.startswith("jaxllm") else None
      if module_path:
        if _defines_flags(module_path):
          found.append(candidate)
        break
  return found


def test_no_test_imports_a_command():
  tests_dir = os.path.join(REPO, "tests")
  bad = [f"{f} imports {m}" for f in sorted(os.listdir(tests_dir)) if f.endswith(".py")
         for m in command_imports(os.path.join(tests_dir, f))]
  assert not bad, "\n".join(bad) + "\n(run commands in a subprocess; import their library)"


def test_a_test_importing_a_command_is_caught(tmp_path):
  planted = tmp_path / "test_planted.py"
  planted.write_text("import jaxllm.train.__main__\nfrom jaxllm import eval\n"
                     "from jaxllm.eval import scoring\n\n\n"
                     "def test_x():\n  from jaxllm.quantize import main\n")
  assert sorted(command_imports(str(planted))) == ["jaxllm.quantize", "jaxllm.train.__main__"]
