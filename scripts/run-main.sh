#!/usr/bin/env bash
# The main job: the ticketing-bot story on the embedded backbone (set-up included). Extra arguments go to the
# demo, e.g. --interactive --user NAME.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m examples.ticketing_bot.demo "$@"
