"""The run directory: stage records, fingerprints, atomic writes, the lock.

A stage writes into its own folders under the run directory and keeps a record,
`<folder>/stage.json`: fingerprint, status (`running` | `complete`), counts, timings,
metrics and the resolved inputs. A stage is up to date when its record is complete and
its fingerprint matches. Every file goes through `atomic_path` (temporary name in the
same folder, renamed into place), so a file that exists is whole. This module knows
nothing about images or models.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

from wsseg.errors import RunFailure, UserError

TMP_PREFIX = ".tmp-"


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (16 hex digits are plenty here)."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place.

    On any error the temporary file is removed and `path` is untouched. A full disk
    (ENOSPC) or another OS error becomes one clear RunFailure naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise RunFailure(f"{path}: no space left on the device; free some space and run again (finished files are kept)") from error
        raise RunFailure(f"{path}: could not write ({error.strerror or error})") from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, value: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """The JSON in `path`, or None when it is missing or damaged (treated as never written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def remove_temporaries(folder: Path) -> None:
    """Delete leftovers of writes that were interrupted (never trusted, never read)."""
    if folder.is_dir():
        for tmp in folder.rglob(f"{TMP_PREFIX}*"):
            tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`<run>/.lock` holding the owner's pid and host; one run per directory.

    A lock left by a dead process on this host is taken over; a live one is refused.
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = read_json(self.path) or {}
                pid, host = owner.get("pid"), owner.get("host")
                if host == me["host"] and isinstance(pid, int) and _pid_alive(pid) and pid != me["pid"]:
                    raise UserError(
                        f"{self.path.parent}: another wsseg run (pid {pid}) is using this run directory; "
                        f"wait for it to finish or stop it"
                    )
                if host not in (None, me["host"]):
                    raise UserError(
                        f"{self.path.parent}: locked by a run on host {host} (pid {pid}); if that run is gone, delete {self.path}"
                    )
                self.path.unlink(missing_ok=True)  # stale: its owner is dead
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise RunFailure(f"{self.path}: could not take the run lock")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_run_dir_is_safe(run_dir: Path, protected: dict[str, Path]) -> None:
    """Refuse a run directory whose stale-output cleaning could delete a user's data.

    `protected` maps a config key (e.g. "data.root") to a folder: the run directory may
    be neither that folder nor one of its parents, and never the home directory or /.
    """
    run = run_dir.resolve()
    home = Path.home().resolve()
    if run in (home, Path(run.anchor)) or run in home.parents:
        raise UserError(f"run.dir: {run_dir} is the home directory or a parent of it; choose a folder of its own, e.g. runs/voc")
    for name, folder in protected.items():
        folder = folder.resolve()
        if run == folder or run in folder.parents:
            raise UserError(f"run.dir: {run_dir} contains {name} ({folder}); choose a run directory outside the dataset")


class RunStore:
    """Stage folders and records inside one run directory."""

    def __init__(self, run_dir: str | os.PathLike):
        self.root = Path(run_dir)

    def folder(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"{relative} is outside the run directory")
        return path

    def record_path(self, record_folder: str) -> Path:
        return self.folder(record_folder) / "stage.json"

    def record(self, record_folder: str) -> dict | None:
        record = read_json(self.record_path(record_folder))
        return record if isinstance(record, dict) else None

    def write_record(self, record_folder: str, record: dict) -> None:
        write_json(self.record_path(record_folder), record)

    def clear(self, relative: str) -> None:
        """Remove a stage's outputs (only ever inside the run directory)."""
        path = self.folder(relative)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
