"""BUILD lists every module and test, with the project dependencies it imports.

BUILD is Starlark (Bazel); its py_library / py_binary / py_test calls are
plain Python syntax, read here with stub rules.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("mqt", "configs", "data", "tests", "bench")


def _targets():
  targets = {}
  def rule(kind):
    def add(name, srcs=(), deps=(), **kwargs):
      assert name not in targets, f"BUILD: duplicate target {name}"
      targets[name] = dict(kind=kind, srcs=list(srcs), deps=list(deps), **kwargs)
    return add
  env = {k: rule(k) for k in ("py_library", "py_binary", "py_test")}
  exec(compile((ROOT / "BUILD").read_text(), "BUILD", "exec"), env)
  return targets


def _sources():
  files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py") if (ROOT / pkg).exists()]
  files += list(ROOT.glob("*.py"))
  return sorted(str(p.relative_to(ROOT)) for p in files
                if ".venv" not in p.parts and (p.name != "__init__.py" or _has_code(p)))


def _has_code(path) -> bool:
  """A package's __init__.py with more than a docstring (a package module of its own)."""
  body = ast.parse(path.read_text()).body
  return any(not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def _project_imports(path):
  """Project files that `path` imports (module or package-relative)."""
  tree = ast.parse((ROOT / path).read_text())
  found = set()
  for node in ast.walk(tree):
    names = []
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    for name in names:
      base = name.replace(".", "/")
      for candidate in (base + ".py", base + "/__init__.py"):
        if (name.split(".")[0] in PACKAGES and (ROOT / candidate).exists()
            and candidate != path and (not candidate.endswith("__init__.py")
                                       or _has_code(ROOT / candidate))):
          found.add(candidate)
  return found


def test_every_module_and_test_has_a_target():
  targets = _targets()
  owned = {}
  for name, t in targets.items():
    for src in t["srcs"]:
      assert (ROOT / src).exists(), f"BUILD target {name} lists missing file {src}"
      assert src not in owned, f"{src} is in both {owned[src]} and {name}"
      owned[src] = name
  missing = [s for s in _sources() if s not in owned]
  assert not missing, f"files with no BUILD target: {missing}"
  for src in _sources():
    if pathlib.Path(src).name.startswith("test_"):
      assert targets[owned[src]]["kind"] == "py_test", f"{src} must be a py_test"


def test_deps_cover_imports():
  targets = _targets()
  owned = {src: name for name, t in targets.items() for src in t["srcs"]}
  for name, t in targets.items():
    deps = {d.lstrip(":") for d in t["deps"]}
    unknown = deps - set(targets)
    assert not unknown, f"BUILD target {name} depends on unknown targets {sorted(unknown)}"
    for src in t["srcs"]:
      needed = {owned[f] for f in _project_imports(src) if owned.get(f) not in (None, name)}
      assert needed <= deps, f"BUILD target {name} imports {sorted(needed - deps)} but does not depend on them"
