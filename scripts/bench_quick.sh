#!/usr/bin/env bash
# Every benchmark in its quick mode (CI runs this after the tests). Benchmarks print
# ratios against a baseline measured in the same process; none of them asserts a time.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
for bench in bench/*_bench.py; do
  echo "=== $bench --quick"
  .venv/bin/python "$bench" --quick
done
