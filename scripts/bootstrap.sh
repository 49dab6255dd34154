#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install exactly the versions in
# requirements/dev.txt (hash-checked), then the project itself, editable, without
# resolving anything. Idempotent: a second run only re-checks the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.monolith-ps-installed
if [ ! -f "$stamp" ] || [ requirements/dev.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
    -r requirements/dev.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps \
    --no-build-isolation -e .
  touch "$stamp"
fi
