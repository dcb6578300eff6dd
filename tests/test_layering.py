"""The import arrows point one way.

- The model layer (the modules that define and run the network) imports nothing from
  a run (parameters of a run, inputs, training, inference, evaluation) nor from data/.
- data/ imports nothing from mqt/.
- The trainer imports neither inference nor evaluation, inference imports neither
  the trainer nor evaluation, and no module reachable from what answers questions
  (inference, evaluation, serving, the server, budgets, adaptive m) imports the trainer
  (mqt/train.py and the modules only it uses).
  Evaluation runs the inference programs, so it may import mqt/inference.py.

Imports are read from the source (function-local ones included), so a violation
hidden inside a function counts too.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

MODEL_LAYER = ("layers", "vision", "query_transformer", "decoder", "model", "generate",
               "matryoshka", "sharding", "maps", "flops", "optim", "memory")
RUN_LAYER = ("params", "run_inputs", "train", "train_step", "train_eval", "plan", "inference",
             "evaluate", "export", "checkpoint", "metrics", "validate", "preemption",
             "budget", "serving", "adaptive", "chat_api", "server")
# What answers questions never reaches the trainer.
SERVING_ENTRY_POINTS = ("mqt.inference", "mqt.evaluate", "mqt.serving", "mqt.server",
                        "mqt.budget", "mqt.adaptive")
TRAINER = ("mqt.train", "mqt.train_step", "mqt.train_eval", "mqt.plan")
FORBIDDEN = (("mqt.train", "mqt.inference"), ("mqt.train", "mqt.evaluate"),
             ("mqt.inference", "mqt.train"), ("mqt.inference", "mqt.evaluate"),
             ("mqt.evaluate", "mqt.train"))


def module_file(root: pathlib.Path, name: str) -> pathlib.Path | None:
  """A dotted module name -> its file under `root` (a module or a package), or None."""
  base = root.joinpath(*name.split("."))
  for path in (base.with_suffix(".py"), base / "__init__.py"):
    if path.is_file():
      return path
  return None


def imports_of(root: pathlib.Path, name: str) -> set[str]:
  """The project modules (dotted names) that module `name` imports, anywhere in it."""
  path = module_file(root, name)
  tree = ast.parse(path.read_text())
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      candidates = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(p for p in parts + [base] if p)
      # `from a import b`: the module a.b where there is one, else a itself.
      candidates = [f"{base}.{a.name}" if module_file(root, f"{base}.{a.name}") else base
                    for a in node.names]
    else:
      continue
    for cand in candidates:
      while cand and module_file(root, cand) is None:
        cand = cand.rpartition(".")[0]
      if cand and cand != name:
        found.add(cand)
  return found


def modules(root: pathlib.Path, package: str) -> list[str]:
  return sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                for p in (root / package).rglob("*.py"))


def reachable(root: pathlib.Path, start: str) -> dict[str, list[str]]:
  """Every project module reachable from `start` -> the import chain that reaches it."""
  chains = {start: [start]}
  todo = [start]
  while todo:
    name = todo.pop()
    for dep in sorted(imports_of(root, name)):
      if dep not in chains:
        chains[dep] = chains[name] + [dep]
        todo.append(dep)
  return chains


def violations(root: pathlib.Path) -> list[str]:
  """Every broken rule of the module docstring, one line each."""
  found = []
  for name in modules(root, "data"):
    found += [f"{name} imports {dep}" for dep in imports_of(root, name)
              if dep.split(".")[0] == "mqt"]
  run = {f"mqt.{n}" for n in RUN_LAYER}
  for n in MODEL_LAYER:
    name = f"mqt.{n}"
    if module_file(root, name) is None:
      continue
    found += [f"{name} (model layer) imports {dep}" for dep in imports_of(root, name)
              if dep in run or dep.split(".")[0] == "data"]
  for start in SERVING_ENTRY_POINTS:
    if module_file(root, start) is None:
      continue
    chains = reachable(root, start)
    found += [f"{start} reaches the trainer: {' -> '.join(chains[t])}"
              for t in TRAINER if t in chains]
  for a, b in FORBIDDEN:
    if module_file(root, a) is not None and b in imports_of(root, a):
      found.append(f"{a} imports {b}")
  return found


def test_the_tree_keeps_the_layers():
  assert violations(ROOT) == []


def test_every_rule_can_fail(tmp_path):
  """A made-up tree that breaks each rule once, one import hidden inside a function."""
  files = {
      "data/__init__.py": "",
      "data/reader.py": "def f():\n  from mqt import paths\n",
      "mqt/__init__.py": "",
      "mqt/paths.py": "",
      "mqt/model.py": "from mqt import params\n",
      "mqt/params.py": "",
      "mqt/helper.py": "from . import train\n",
      "mqt/inference.py": "from mqt import helper\n",
      "mqt/evaluate.py": "import mqt.inference\n",
      "mqt/train.py": "import mqt.evaluate\n",
  }
  for rel, text in files.items():
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)
  got = violations(tmp_path)
  assert got == [
      "data.reader imports mqt.paths",
      "mqt.model (model layer) imports mqt.params",
      "mqt.inference reaches the trainer: mqt.inference -> mqt.helper -> mqt.train",
      "mqt.evaluate reaches the trainer: mqt.evaluate -> mqt.inference -> mqt.helper -> "
      "mqt.train",
      "mqt.train imports mqt.evaluate",
  ], got


def test_the_run_layer_modules_exist():
  """The names above are real modules (a renamed module would silently pass the rules)."""
  missing = [n for n in MODEL_LAYER + RUN_LAYER if module_file(ROOT, f"mqt.{n}") is None]
  assert missing == []
