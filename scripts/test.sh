#!/usr/bin/env bash
# Runs the test suite (8 simulated CPU devices; see tests/conftest.py), two workers.
source "$(dirname "$0")/env.sh"
exec python -m pytest -n 2 tests "$@"
