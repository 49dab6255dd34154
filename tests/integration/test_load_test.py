"""``bench/load_test.py`` in a very short mode, as a subprocess.

A clean run must pass its exactly-once audit; a run with a doubled update on the
cluster and an update the cluster never got (``--inject-double --inject-lost``)
must fail it with exactly those row updates counted; a run past its hard timeout
must stop by itself and take its shards down.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.integration

SCRIPT = REPO / "bench" / "load_test.py"
SHORT = ["--seconds", "3", "--clients", "2", "--shards", "2"]
VERIFICATION = re.compile(
    r"^verification: lost: (\d+), doubled: (\d+), mismatched ids: (\d+), "
    r"sizes equal: (yes|no), failed RPCs: (\d+) -> (PASS|FAIL)$", re.M
)


def run(*args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def verification(out: str) -> tuple[int, int, int, str, int, str]:
    m = VERIFICATION.search(out)
    assert m, out
    lost, doubled, mismatched, sizes, failed, verdict = m.groups()
    return int(lost), int(doubled), int(mismatched), sizes, int(failed), verdict


def test_clean_run_passes_the_audit() -> None:
    done = run(*SHORT)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert verification(out) == (0, 0, 0, "yes", 0, "PASS")
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("load_test: PASS clients=2 shards=2 "), summary
    fields = dict(kv.split("=", 1) for kv in summary.split()[2:])
    assert int(fields["updates"]) > 0 and int(fields["row_updates"]) >= int(fields["updates"])
    assert float(fields["ops/s"]) > 0 and fields["lost"] == fields["doubled"] == "0"
    # Every kind of operation ran at least once (per-kind table: name, ops, ...).
    for kind in ("lookup", "sgd", "sgd_dedup", "adagrad", "adagrad_dedup", "assign_add"):
        row = re.search(rf"^{kind}\s+(\d+)\s", out, re.M)
        assert row and int(row.group(1)) > 0, (kind, out)


def test_injected_double_and_loss_fail_the_audit() -> None:
    done = run(*SHORT, "--inject-double", "--inject-lost")
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    inj = re.search(r"^injected: doubled (\d+) row updates of sgd, lost (\d+) row updates "
                    r"of counter$", out, re.M)
    assert inj, out
    doubled_rows, lost_rows = int(inj.group(1)), int(inj.group(2))
    assert doubled_rows > 0 and lost_rows > 0
    lost, doubled, mismatched, sizes, failed, verdict = verification(out)
    # One SGD update sent twice: each of its rows lands one extra time on the cluster.
    # One assign_add replayed twice on the reference: each of its rows is one short.
    assert (lost, doubled) == (lost_rows, doubled_rows)
    assert 2 <= mismatched <= lost_rows + doubled_rows
    assert (sizes, failed, verdict) == ("yes", 0, "FAIL")
    assert out.strip().splitlines()[-1].startswith("load_test: FAIL ")


def test_hard_timeout_stops_the_run_and_its_shards() -> None:
    t0 = time.monotonic()
    # The hard timeout counts from the moment both shards report SERVING, so a busy
    # machine's slow start-up (limit 60 s) does not eat into it.
    # A run that ignored it would last its 600 s of load (and hit the 180 s here).
    done = run("--seconds", "600", "--clients", "2", "--shards", "2", "--hard-timeout", "3")
    assert done.returncode == 3, done.stdout + done.stderr
    assert time.monotonic() - t0 < 150  # 60 s start-up limit + 3 s + the stop's grace
    assert "HARD TIMEOUT after 3s" in done.stderr
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", done.stdout)]
    assert len(pids) == 2, done.stdout
    for pid in pids:
        assert not _running(pid), f"shard pid {pid} still runs"


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting a reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
