#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml with pip-tools (pinned below):
#   requirements/dev.txt      every runtime, development and build dependency (bootstrap.sh, CI)
#   requirements/runtime.txt  the runtime subset, same versions (the Dockerfile)
#   requirements/build.txt    the build backend alone, same version (the Dockerfile's builder)
#   requirements/torch.txt    the [torch] extra alone (requirements/torch.in), same versions
#                             as dev.txt where they share packages (bootstrap.sh --torch)
# All carry sha256 hashes and are installed with --require-hashes.
#
#   bash scripts/lock.sh                 keep current pins, add what pyproject.toml now needs
#   bash scripts/lock.sh --upgrade       move every pin to the newest allowed release
#   bash scripts/lock.sh -P ruff         move one package only
#
# After an upgrade of grpcio-tools, run `python -m protos.generate` and commit the result.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tools=${LOCK_TOOLS_VENV:-.venv-lock}
if [ ! -x "$tools/bin/pip-compile" ]; then
  "$PY" -m venv "$tools"
  "$tools/bin/python" -m pip install -q pip-tools==7.7.0
fi
common=(--quiet --generate-hashes --allow-unsafe --strip-extras
        --no-emit-find-links --no-emit-index-url --no-emit-trusted-host)
"$tools/bin/pip-compile" "${common[@]}" "$@" --extra dev \
  -o requirements/dev.txt pyproject.toml requirements/build.in
# The runtime file is constrained by the dev file so both name the same versions.
"$tools/bin/pip-compile" "${common[@]}" -c requirements/dev.txt \
  -o requirements/runtime.txt pyproject.toml
"$tools/bin/pip-compile" "${common[@]}" -c requirements/dev.txt \
  -o requirements/build.txt requirements/build.in
"$tools/bin/pip-compile" "${common[@]}" -c requirements/dev.txt \
  -o requirements/torch.txt requirements/torch.in
echo "locked: requirements/dev.txt requirements/runtime.txt requirements/build.txt requirements/torch.txt"
