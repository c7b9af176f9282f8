#!/usr/bin/env bash
# Lint and the whole test suite, slow tests on the embedded backbone included (set-up included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
