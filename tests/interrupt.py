"""Killing a process at a chosen point of a stage, whatever the machine's load.

The child process runs with `os.replace` wrapped: once `count` files matching `pattern`
have been renamed into place (every wsseg file is written that way, see store.atomic_path),
it creates a marker file and sleeps for good. The test waits for the marker, not for a
number of seconds, and kills the child there: the stage is always interrupted at the same
point, on an idle machine or a busy one. The only clock is a generous guard against a hang.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PAUSE = """
import fnmatch as _fnmatch, os as _os, time as _time
_replace, _seen = _os.replace, []
def _replace_then_pause(src, dst, *args, **kwargs):
    _replace(src, dst, *args, **kwargs)
    if _fnmatch.fnmatch(_os.fspath(dst), {pattern!r}):
        _seen.append(dst)
        if len(_seen) >= {count}:
            open({marker!r}, "w").close()
            while True:
                _time.sleep(1)
_os.replace = _replace_then_pause
"""

GUARD_SECONDS = 900  # only against a hang: the wait is for the marker


def kill_when_written(code: str, folder: Path, pattern: str, count: int = 1) -> None:
    """Run `code` in a child process and kill it right after the `count`-th file matching
    `pattern` (a glob over full paths) was written."""
    marker = folder / "paused.marker"
    marker.unlink(missing_ok=True)
    script = folder / "interrupted.py"
    script.write_text(PAUSE.format(pattern=pattern, count=count, marker=str(marker)) + code)
    process = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + GUARD_SECONDS
    try:
        while not marker.exists():
            if process.poll() is not None:
                raise AssertionError(f"the child process ended (exit {process.returncode}) before writing "
                                     f"{count} file(s) matching {pattern}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} file(s) matching {pattern} after {GUARD_SECONDS} s")
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
