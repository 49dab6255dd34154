#!/usr/bin/env bash
# Create (or reuse) the project's virtualenv in .venv and install exactly the versions in
# requirements/dev.txt (hash-checked), then the project itself, editable, without
# resolving anything. Idempotent: a second run only re-checks the stamp.
#
#   bash scripts/bootstrap.sh            the core and its development tools
#   bash scripts/bootstrap.sh --torch    also the [torch] extra from requirements/torch.txt
#                                        (hash-checked; ~50 s more on a fresh venv)
#   bash scripts/bootstrap.sh --torchrec also TorchRec on CPU from requirements/torchrec.txt
#                                        (implies --torch; hash-checked, --no-deps on top of
#                                        torch.txt so torch is never replaced; ~5-20 s more)
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
if [ "${1:-}" = "--torch" ] || [ "${1:-}" = "--torchrec" ]; then
  tstamp=.venv/.monolith-ps-torch-installed
  if [ ! -f "$tstamp" ] || [ requirements/torch.txt -nt "$tstamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
      -r requirements/torch.txt
    touch "$tstamp"
  fi
  if [ "${1:-}" = "--torchrec" ]; then
    rstamp=.venv/.monolith-ps-torchrec-installed
    if [ ! -f "$rstamp" ] || [ requirements/torchrec.txt -nt "$rstamp" ]; then
      # --no-deps: the lock leaves out torch (torch.txt's) and the CUDA `fbgemm-gpu` that
      # torchrec names; fbgemm-gpu-cpu provides its module (see requirements/torchrec.in).
      .venv/bin/python -m pip install -q --disable-pip-version-check --require-hashes \
        --no-deps -r requirements/torchrec.txt
      touch "$rstamp"
    fi
  fi
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/bootstrap.sh [--torch | --torchrec]" >&2
  exit 2
fi
