"""The package's layout rules: no import circle, and data flows one way
(a loss never imports a model, a model never imports data)."""

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "contrastive_jax")


def _module_imports() -> dict:
  """{module: set of contrastive_jax modules it imports} from the package's source."""
  graph = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(root, name)
      rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
      module = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
      deps = set()
      tree = ast.parse(open(path).read())
      # What runs only when the module is the program (`python -m ...`) is never run by an
      # import: `train.py` hands its command line to `main.py` there.
      tree.body = [n for n in tree.body if not (
          isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
            "contrastive_jax"):
          # `from contrastive_jax.x import y`: y may be a module or a name in x.
          deps.update(f"{node.module}.{a.name}" for a in node.names)
          deps.add(node.module)
        elif isinstance(node, ast.Import):
          deps.update(a.name for a in node.names if a.name.startswith("contrastive_jax"))
      graph[module] = deps
  # Keep only edges to modules that exist (drop imported names).
  return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def _parents(module: str) -> list[str]:
  """Importing a.b.c runs a/__init__ and a/b/__init__ first."""
  parts = module.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_circle():
  graph = _module_imports()
  # A submodule's import also imports its parent packages.
  edges = {m: (deps | {p for d in deps for p in _parents(d) if p in graph}) - {m}
           for m, deps in graph.items()}
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(edges[m]):
      if d in _parents(m):
        continue  # a package's own __init__ runs before its submodules: not a circle
      if state.get(d) == "open":
        raise AssertionError("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
      if d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m)


def test_data_flows_one_way():
  graph = _module_imports()
  for m, deps in graph.items():
    deps = deps - {"contrastive_jax"}  # the (empty) top-level package
    if m.startswith("contrastive_jax.losses"):
      assert not [d for d in deps if not d.startswith(("contrastive_jax.losses",
                                                       "contrastive_jax.metrics"))], (m, deps)
    if m.startswith("contrastive_jax.models"):
      assert not [d for d in deps if d.startswith(("contrastive_jax.data",
                                                   "contrastive_jax.tasks",
                                                   "contrastive_jax.train"))], (m, deps)
    if m.startswith(("contrastive_jax.tasks", "contrastive_jax.data")):
      assert "contrastive_jax.train" not in deps, (m, deps)
