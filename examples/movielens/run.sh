#!/usr/bin/env bash
# MovieLens-100k through the shards and in memory: the same DeepFM, data, seed and
# Adagrad settings trained (1) with its sparse part on a local 2-shard cluster and
# (2) with torch.nn.EmbeddingBag + torch.optim.Adagrad; prints both test AUCs.
# The data set is fetched at run time from RecBole's wheel on PyPI (see data.py) and
# cached under ~/.cache/monolith-ps/movielens (or --cache_dir); it is not shipped here.
# Extra arguments go to both runs (e.g. --epochs 3 --cache_dir /tmp/ml).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/bootstrap.sh --torch >/dev/null
py=.venv/bin/python
log=$(mktemp -d)
trap 'rm -rf "$log"' EXIT
start=$(date +%s)
echo "== through a local 2-shard cluster"
$py examples/movielens/train.py --num_shards 2 --save_rows "$log/shards.npz" "$@" | tee "$log/shards"
echo "== in memory (torch.nn.EmbeddingBag + torch.optim.Adagrad)"
$py examples/movielens/train.py --in_memory --save_rows "$log/memory.npz" "$@" | tee "$log/memory"
$py - "$log/shards" "$log/memory" "$(( $(date +%s) - start ))" <<'PY'
import re, sys
import numpy as np
a, b = np.load(sys.argv[1] + ".npz"), np.load(sys.argv[2] + ".npz")
diff = max(float(np.abs(a[f] - b[f]).max()) for f in a.files)
scale = max(float(np.abs(b[f]).max()) for f in b.files)
print(f"final embedding rows: max |shards - in memory| {diff:.2e} (largest |value| {scale:.2f})")
auc = [float(re.search(r"RESULT .*test_auc=(\S+)", open(p).read()).group(1)) for p in sys.argv[1:3]]
print(f"test AUC: shards {auc[0]:.4f}, in memory {auc[1]:.4f}, "
      f"|difference| {abs(auc[0] - auc[1]):.4f} (target <= 0.005); {sys.argv[3]} s in all")
sys.exit(0 if abs(auc[0] - auc[1]) <= 0.005 else 1)
PY
