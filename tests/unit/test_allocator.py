"""``ps_server.runtime.keep_freed_memory``: glibc takes the fixed thresholds (the CI and
deploy images are glibc), and a second call changes nothing."""

from __future__ import annotations

import platform

import pytest

from ps_server import runtime


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_glibc_takes_the_fixed_thresholds_once() -> None:
    assert runtime.keep_freed_memory()
    assert runtime._allocator_tuned
    assert runtime.keep_freed_memory()  # idempotent
    assert runtime.MMAP_THRESHOLD_BYTES < runtime.TRIM_THRESHOLD_BYTES
