#!/usr/bin/env bash
# Two data-parallel PyTorch trainers on one local 2-shard cluster:
#   start 2 shard processes (port 0, each writes its port to a file), run
#   `torchrun --standalone --nproc_per_node=2 examples/ddp/train.py`, stop the shards.
# Extra arguments go to train.py, e.g. `bash examples/ddp/run.sh --steps=50 --sync_sparse`.
# Environment: NPROC (trainers, default 2), SHARDS (default 2), MODEL_DIR (checkpoint
# directory; default a temporary one, kept and printed).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/bootstrap.sh --torch >/dev/null

NPROC="${NPROC:-2}"
SHARDS="${SHARDS:-2}"
WORK="$(mktemp -d -t ps_ddp_XXXXXX)"
MODEL_DIR="${MODEL_DIR:-$WORK/model}"
PIDS=()

stop_shards() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_shards EXIT

for ((i = 0; i < SHARDS; i++)); do
  .venv/bin/python -m ps_server --host=127.0.0.1 --port=0 --port_file="$WORK/port$i" \
    --shard_index="$i" --num_shards="$SHARDS" 2>"$WORK/shard$i.log" &
  PIDS+=("$!")
done

ADDRESSES=""
for ((i = 0; i < SHARDS; i++)); do
  for _ in $(seq 600); do                      # up to 60 s for each port file
    [[ -s "$WORK/port$i" ]] && break
    kill -0 "${PIDS[$i]}" 2>/dev/null || { cat "$WORK/shard$i.log" >&2; exit 1; }
    sleep 0.1
  done
  [[ -s "$WORK/port$i" ]] || { echo "shard $i wrote no port file" >&2; exit 1; }
  ADDRESSES+="${ADDRESSES:+,}127.0.0.1:$(cat "$WORK/port$i")"
done
echo "shards: $ADDRESSES (logs in $WORK)"

mkdir -p "$MODEL_DIR"
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/torchrun --standalone \
  --nproc_per_node="$NPROC" examples/ddp/train.py \
  --addresses="$ADDRESSES" --model_dir="$MODEL_DIR" "$@"
echo "checkpoint: $MODEL_DIR"
