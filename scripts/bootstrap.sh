#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install exactly the versions in
# requirements/dev.txt (hash-checked), then the project itself, editable, without
# resolving anything. Idempotent: a second run only re-checks the stamp.
#
#   bash scripts/bootstrap.sh            the core and its development tools
#   bash scripts/bootstrap.sh --torch    also the [torch] extra from requirements/torch.txt
#                                        (hash-checked; ~50 s more on a fresh venv)
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
if [ "${1:-}" = "--torch" ]; then
  tstamp=.venv/.monolith-ps-torch-installed
  if [ ! -f "$tstamp" ] || [ requirements/torch.txt -nt "$tstamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
      -r requirements/torch.txt
    touch "$tstamp"
  fi
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/bootstrap.sh [--torch]" >&2
  exit 2
fi
