#!/usr/bin/env bash
# Lint and the whole test suite, slow tests on the embedded backbone included (set-up included). The Postgres
# tests use $DELTAMEM_TEST_POSTGRES_URL; when it is unset and we may, a local server is started for them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${DELTAMEM_TEST_POSTGRES_URL:-}" ] && [ "$(id -u)" = 0 ]; then
  if url="$(bash scripts/start-postgres.sh 2>/dev/null | tail -n 1)"; then
    export DELTAMEM_TEST_POSTGRES_URL="$url"
  else
    echo "note: no PostgreSQL server could be started; the Postgres tests will be skipped" >&2
  fi
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -q "$@"
