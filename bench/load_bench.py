"""CI entry of the load test (``scripts/bench_quick.sh`` runs ``bench/*_bench.py``).

The implementation and its documentation are in :mod:`bench.load_test`; this file
only forwards the command line to it.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load_test import main

if __name__ == "__main__":
    sys.exit(main())
