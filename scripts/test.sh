#!/usr/bin/env bash
# Runs the linter, then the test suite (8 simulated CPU devices; see tests/conftest.py) on
# two workers. Arguments go to pytest: `bash scripts/test.sh -m "not slow"` is the fast
# subset (under 3 minutes on 2 cores).
export CJ_EXTRAS=test
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
ruff check --quiet . || { echo "ruff check failed: fix the lines above" >&2; exit 1; }
exec python -m pytest -n 2 tests "$@"
