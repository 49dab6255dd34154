#!/usr/bin/env bash
# The main job: start a local 2-shard cluster and train the demo CTR model on it
# (checkpoint half-way, kill and restore a shard, finish, print the final AUC).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python examples/demo_trainer.py "$@"
