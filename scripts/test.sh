#!/usr/bin/env bash
# Lint, then the whole test suite (unit tests, doctests and the end-to-end runs on a local Ray).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check agecore ray_jobs tests benchmarks scripts
.venv/bin/python -m pytest --durations=15 "$@"
