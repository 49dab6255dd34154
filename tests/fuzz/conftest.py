"""Reports how many hostile requests the fuzz suite sent and their outcomes (issue 7,
item 3; issue 12): every request goes through ``tests.fuzz.oracle`` (``Harness.send``
or ``call``), which counts it in ``STATS``."""

from __future__ import annotations

import sys
from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    module = sys.modules.get("tests.fuzz.oracle")
    if module is None or not module.STATS.total:
        return
    stats = module.STATS
    terminalreporter.section("hostile input")
    for line in stats.report():
        terminalreporter.write_line(line)
