#!/usr/bin/env bash
# Create .venv and install the locked dependencies (+ poisonguard itself, editable).
# Uses uv when it can (seconds), pip otherwise (minutes). Offline apart from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
FIND_LINKS=${PIP_FIND_LINKS:-/opt/wheels}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
links=()
[ -d "$FIND_LINKS" ] && links=(--find-links "$FIND_LINKS")
if ! command -v uv >/dev/null 2>&1 && [ ! -x .venv/bin/uv ]; then
  .venv/bin/python -m pip install -q uv || true
fi
UV=$(command -v uv || echo .venv/bin/uv)
if [ -x "$UV" ] || command -v "$UV" >/dev/null 2>&1; then
  # --find-links: the CPU torch wheel lies there (without it uv takes a multi-GB CUDA build)
  # --compile-bytecode: Prefect starts twice as fast
  "$UV" pip install --python .venv/bin/python "${links[@]}" --compile-bytecode -q -r requirements.lock
  "$UV" pip install --python .venv/bin/python --no-deps -q -e .
else
  .venv/bin/python -m pip install -q "${links[@]}" -r requirements.lock
  .venv/bin/python -m pip install -q --no-deps -e .
fi
touch .venv/.installed
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, prefect; print("torch", torch.__version__, "prefect", prefect.__version__)'))"
