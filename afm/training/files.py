"""The files of a run directory: written so that a kill never leaves a half file, read
so that damage is reported with the path, locked so that two runs never share one.

* :func:`write_text_atomic` / :func:`write_json_atomic` — a temporary file next to the
  target (``.NAME.tmp-PID``), flushed to disk, then renamed over it;
* :func:`read_json` — the parsed file, or :class:`DamagedFileError` naming it;
* :func:`sha256_file` — the checksum manifests record;
* :func:`remove_orphans` — temporary files and directories (``.NAME.tmp-PID``) left by
  processes that no longer run;
* :class:`RunLock` — an exclusive lock on ``DIR/.afm-<command>.lock`` that holds its
  owner's pid.  It is an ``fcntl.flock``, which the kernel releases when the owner dies
  (SIGKILL included), so a lock file left by a killed run is stale and is taken over
  with a warning.  Lock files on NFS need a server with lock support.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any

__all__ = [
    "DamagedFileError",
    "OutputInUseError",
    "RunLock",
    "is_temporary",
    "lock_name",
    "pid_alive",
    "read_json",
    "remove_orphans",
    "sha256_file",
    "tmp_name",
    "write_json_atomic",
    "write_text_atomic",
]

logger = logging.getLogger(__name__)

_ORPHAN = re.compile(r"^\..+\.tmp-(\d+)$")


class DamagedFileError(ValueError):
    """A file afm wrote earlier is missing or unreadable (the message names it)."""


class OutputInUseError(ValueError):
    """Another running process holds the lock of the output directory."""


def tmp_name(path: Path) -> Path:
    """The temporary name of ``path`` for this process (:func:`remove_orphans` knows it)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one."""
    target = Path(path)
    tmp = tmp_name(target)
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike[str], what: str = "file") -> Any:
    """The JSON content of ``path``; a missing or damaged file raises
    :class:`DamagedFileError` naming ``what`` and the path."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DamagedFileError(f"{what} {str(p)!r} is missing") from None
    except json.JSONDecodeError as err:
        raise DamagedFileError(
            f"{what} {str(p)!r} is damaged (not valid JSON: {err.msg} at line {err.lineno})"
        ) from None
    except (UnicodeDecodeError, OSError) as err:
        raise DamagedFileError(f"{what} {str(p)!r} is unreadable ({err})") from None


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` runs on this machine (or may: not ours to signal)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_temporary(name: str) -> bool:
    """True for a temporary name of :func:`tmp_name` (``.NAME.tmp-PID``)."""
    return _ORPHAN.match(name) is not None


def remove_orphans(directory: str | os.PathLike[str], prefixes: tuple[str, ...]) -> list[str]:
    """Delete ``.NAME.tmp-PID`` entries of ``directory`` that start with one of
    ``prefixes`` and whose process is gone: what a killed writer left behind.  The
    caller names only entries no process on another machine writes.  Returns the names
    removed."""
    d = Path(directory)
    removed: list[str] = []
    if not d.is_dir() or not prefixes:
        return removed
    for entry in sorted(d.iterdir()):
        m = _ORPHAN.match(entry.name)
        if not m or not entry.name.startswith(prefixes) or pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    if removed:
        logger.info("removed %d leftovers of killed runs in %s: %s", len(removed), d, removed)
    return removed


def _owner(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        owner = json.loads(raw.decode()) if raw.strip() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"pid": "?", "damaged": True}
    return owner if isinstance(owner, dict) else {}


def lock_name(command: str) -> str:
    """The lock file's name of ``command`` in its output directory."""
    return f".{command}.lock"


class RunLock:
    """``with RunLock(out, "afm-train"):`` — refuse to share ``out`` with a running
    process (:class:`OutputInUseError`), take over a stale lock, release on exit."""

    def __init__(self, directory: str | os.PathLike[str], command: str) -> None:
        self.directory = Path(directory)
        self.command = command
        self.path = self.directory / lock_name(command)
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise OutputInUseError(
                    f"output directory {str(self.directory)!r} is in use by another "
                    f"{self.command} (pid {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')}, lock file {str(self.path)!r}); wait for it "
                    "to finish or choose another output directory"
                ) from None
            try:  # the file may have been released and removed between open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _owner(fd)
        if previous:
            logger.warning(
                "%s: taking over a stale lock of pid %s on %s (that run ended without "
                "releasing it, e.g. it was killed)",
                self.path,
                previous.get("pid", "?"),
                previous.get("host", "?"),
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: see acquire
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
