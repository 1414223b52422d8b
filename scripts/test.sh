#!/usr/bin/env bash
# Runs the test suite (8 simulated CPU devices; see tests/conftest.py), two workers.
export CJ_EXTRAS=test
# shellcheck source=scripts/env.sh
source "$(dirname "$0")/env.sh"
exec python -m pytest -n 2 tests "$@"
