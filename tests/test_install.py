"""Installs that fit each kind of user: `pip install contrastive_jax` gives the
losses and metrics on jax alone; the extras declare everything else they import."""

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "contrastive_jax")


def _project() -> dict:
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def _project_version(freeze: str) -> str:
  """The installed version of contrastive_jax in `pip list --format=freeze` output."""
  return re.search(r"^contrastive[-_]jax==(\S+)$", freeze, re.M).group(1)


def _names(requirements) -> set[str]:
  """Normalised distribution names of requirement strings (extras of ourselves expanded)."""
  out = set()
  for r in requirements:
    name = re.match(r"[A-Za-z0-9_.\-]+", r).group(0)
    out.add(re.sub(r"[-_.]+", "-", name).lower())
  return out


def _declared(*extras: str) -> set[str]:
  project = _project()
  names = _names(project["dependencies"])
  for extra in extras:
    names |= _names(project["optional-dependencies"][extra])
  return names


def _imports(path: str) -> set[str]:
  """Top-level module names a source file imports (at module level or inside functions)."""
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.level == 0:
      out.add(node.module.split(".")[0])
  return out - set(sys.stdlib_module_names) - {"contrastive_jax", "__future__"}


def _tier(relpath: str) -> tuple[str, ...]:
  """The extras a module may use: losses and metrics none, the plotter 'experiments'."""
  if relpath.startswith("losses/") or relpath == "metrics.py":
    return ()
  if relpath == "plot.py":
    return ("train", "experiments")
  if relpath == "summary.py":  # W&B, imported only by a run that logs there
    return ("train", "wandb")
  return ("train",)


def test_every_import_of_the_package_is_declared_in_its_tier():
  distributions = importlib.metadata.packages_distributions()
  checked = 0
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      rel = os.path.relpath(path, PACKAGE).replace(os.sep, "/")
      allowed = _declared(*_tier(rel))
      for module in _imports(path):
        dists = _names(distributions.get(module, [module]))
        assert dists & allowed, (f"contrastive_jax/{rel} imports {module} ({dists}), which "
                                 f"pyproject.toml does not declare for {_tier(rel) or 'core'}")
        checked += 1
  assert checked > 30


def test_constraints_pin_every_declared_distribution_exactly():
  pins = {}
  for line in open(os.path.join(ROOT, "constraints.txt")):
    line = line.split("#")[0].strip()
    if line:
      name, version = line.split("==")
      pins[re.sub(r"[-_.]+", "-", name).lower()] = version
  for name in _declared("train", "gcs", "experiments", "test") - {"contrastive-jax"}:
    assert name in pins, f"{name} is not pinned in constraints.txt"
  installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version
               for d in importlib.metadata.distributions()}
  for name in _declared("train", "test") - {"contrastive-jax"}:  # what this venv has
    assert installed.get(name) == pins[name], (name, installed.get(name), pins[name])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("python3") is None, reason="no python3 to make a venv")
@pytest.mark.slow
def test_the_built_wheel_installs_plain_and_runs_a_loss_on_jax_alone(tmp_path):
  """python -m build makes the sdist and the wheel, twine check passes on both, and the
  wheel (no extras) in a fresh venv runs the losses without flax, tfds or grain."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "constraints.txt", "LICENSE", "CHANGELOG.md"):
    shutil.copy(os.path.join(ROOT, name), src / name)
  shutil.copytree(PACKAGE, src / "contrastive_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  dist = tmp_path / "dist"
  built = subprocess.run([sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir",
                          str(dist), str(src)], capture_output=True, text=True, timeout=600)
  assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
  wheels, sdists = sorted(dist.glob("*.whl")), sorted(dist.glob("*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
  check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", *map(str, wheels),
                          *map(str, sdists)], capture_output=True, text=True, timeout=120)
  assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  python = str(venv / "bin" / "python")
  out = subprocess.run([python, "-m", "pip", "install", "-q", "-c", "constraints.txt",
                        str(wheels[0])], cwd=src, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True,
                          text=True, check=True).stdout.lower()
  for absent in ("flax", "tensorflow-datasets", "grain", "optax", "orbax", "tensorboardx"):
    assert absent not in listed, absent
  version = subprocess.run([python, "-c", "import contrastive_jax; print(contrastive_jax.__version__)"],
                           cwd=tmp_path, capture_output=True, text=True).stdout.strip()
  assert version == _project_version(listed), (version, listed)
  code = ("import jax, jax.numpy as jnp; from contrastive_jax import losses as L, metrics; "
          "a = jax.random.normal(jax.random.PRNGKey(0), (8, 4)); b = a + 0.1; "
          "s = L.init_gamma_state(8); "
          "v, s = L.gamma_loss(a, b, s, jnp.arange(8), jax.random.PRNGKey(1), temperature=0.1); "
          "g = jax.grad(lambda x: L.nt_xent(x, b, temperature=0.2))(a); "
          "print(float(L.nt_xent(a, b, temperature=0.2)), float(v), g.shape)")
  run = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip().endswith("(8, 4)")
  # The trainer's console script without its extra: one line naming the extra.
  cli = subprocess.run([str(venv / "bin" / "contrastive-jax-train"), "--help"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
  assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr[-2000:]
  assert cli.stderr.strip().splitlines() == [
      "error: the trainer needs the 'train' extra (absl is not installed): "
      "pip install '.[train]' from a checkout"], cli.stderr


def _copy_project(dest):
  dest.mkdir()
  for name in ("pyproject.toml", "README.md", "constraints.txt", "LICENSE"):
    shutil.copy(os.path.join(ROOT, name), dest / name)
  shutil.copytree(PACKAGE, dest / "contrastive_jax", ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.slow
def test_configs_run_by_name_and_by_path_from_any_directory_after_a_plain_install(tmp_path):
  """A regular (not editable) install into a fresh venv, whose dependencies come from
  this venv: `--config mnist_gamma:smoke` (a name) and an absolute path to a config
  file both train 2 steps from an empty directory outside the checkout."""
  _copy_project(tmp_path / "src")
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  site = subprocess.run([str(venv / "bin" / "python"), "-c", "import site; print(site.getsitepackages()[0])"],
                        capture_output=True, text=True, check=True).stdout.strip()
  deps = [p for p in sys.path if p.endswith("site-packages")]
  with open(os.path.join(site, "deps.pth"), "w") as f:  # the dependencies, not our package
    f.write("\n".join(deps) + "\n")
  out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "."],
                       cwd=tmp_path / "src", capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  data_dir = tmp_path / "tfds"
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  (elsewhere / "my_config.py").write_text(
      "from contrastive_jax.configs import mnist_gamma\n"
      "def get_config():\n  return mnist_gamma.get_config('smoke')\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  for config in ("mnist_gamma:smoke", str(elsewhere / "my_config.py")):
    work = elsewhere / f"run_{len(os.listdir(elsewhere))}"
    run = subprocess.run(
        [str(venv / "bin" / "contrastive-jax-train"), "--config", config, "--workdir", str(work),
         f"--config.data_dir={data_dir}", "--config.num_steps=2", "--config.evals.rank.final=False",
         "--config.evals.linear_probe.final=False"],
        cwd=elsewhere, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, (config, run.stderr[-3000:])
    assert "kNN top-1" in run.stdout, run.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import contrastive_jax; print(contrastive_jax.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, env=env).stdout
    assert where.startswith(site), where  # the installed copy, not the checkout
