#!/usr/bin/env bash
# The main job on the embedded backbone (set-up included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/deltamem demo "$@"
