"""The worker's malloc settings (worker/allocator.py): freed large buffers leave the process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# 32 buffers of 8 MiB (a look-ahead span's order of size), touched, then all freed but the
# last one allocated. glibc's default keeps the freed ones in its heap below the live one
# (after one such block has been freed, it stops mapping blocks of that size on their own).
PROBE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    if sys.argv[1] == "settings":
        from worker.allocator import return_freed_memory
        assert return_freed_memory()

    def rss():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    first = bytearray(8 << 20)
    del first
    base = rss()
    blocks = [bytearray(8 << 20) for _ in range(32)]
    for block in blocks:
        block[::4096] = bytes(len(block[::4096]))
    last = blocks[-1]
    del blocks
    print((rss() - base) >> 20)
    """
)


def _retained_mib(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_freed_buffers_go_back_to_the_system_with_the_worker_settings() -> None:
    without, with_settings = _retained_mib("default"), _retained_mib("settings")
    assert without >= 128, f"glibc's default kept only {without} MiB: the probe shows nothing"
    assert with_settings <= 24, f"{with_settings} MiB still held after the buffers were freed"
