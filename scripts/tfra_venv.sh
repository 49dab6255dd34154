#!/usr/bin/env bash
# Create (or reuse) the side venv .venv-tfra holding TensorFlow 2.16.2 (CPU) and
# TensorFlow Recommenders-Addons 0.8.1, the peer that bench/trainer_bench.py compares the
# sync Table API with (bench/tfra_peer.py runs in it). The project never depends on
# TensorFlow: nothing here touches .venv or pyproject.toml.
#
#   bash scripts/tfra_venv.sh          install exactly requirements/tfra.txt (hash-checked)
#   bash scripts/tfra_venv.sh --lock   re-lock requirements/tfra.in into requirements/tfra.txt
#                                      with pip-tools (in .venv-lock), then install
#
# Wheels exist for CPython 3.11 on x86_64 Linux (both are manylinux2014). About 2.3 GB on
# disk once installed; ~1 min to install here from a warm pip cache.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
venv=${TFRA_VENV:-.venv-tfra}
if [ "${1:-}" = "--lock" ]; then
  tools=${LOCK_TOOLS_VENV:-.venv-lock}
  if [ ! -x "$tools/bin/pip-compile" ]; then
    "$PY" -m venv "$tools"
    "$tools/bin/python" -m pip install -q pip-tools==7.7.0
  fi
  "$tools/bin/pip-compile" --quiet --generate-hashes --allow-unsafe --strip-extras \
    --no-emit-find-links --no-emit-index-url --no-emit-trusted-host \
    -o requirements/tfra.txt requirements/tfra.in
elif [ -n "${1:-}" ]; then
  echo "usage: bash scripts/tfra_venv.sh [--lock]" >&2
  exit 2
fi
if [ ! -x "$venv/bin/python" ]; then
  "$PY" -m venv "$venv"
fi
stamp=$venv/.tfra-installed
if [ ! -f "$stamp" ] || [ requirements/tfra.txt -nt "$stamp" ]; then
  start=$(date +%s)
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --require-hashes \
    -r requirements/tfra.txt
  touch "$stamp"
  echo "installed in $(( $(date +%s) - start )) s; $(du -sh "$venv" | cut -f1) on disk"
fi
"$venv/bin/python" -c 'import tensorflow as tf, tensorflow_recommenders_addons as tfra;
print("tensorflow", tf.__version__, "/ tfra", tfra.__version__)' 2>/dev/null | tail -1
