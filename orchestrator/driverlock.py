"""One sweep, one driver: an ``flock`` on ``STORAGE/NAME/.driver.lock`` held for the driver's life.

Two drivers of one sweep would run every trial twice into one parent run. The kernel drops an flock
when its process ends, however it ends, so a crashed driver never leaves a lock that blocks; the
file's text (``host:pid`` and start time) only names the holder in the refusal. Readers (``status``,
the queries) never take it.
"""
from __future__ import annotations

import fcntl
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from trainables.errors import UserError

__all__ = ["LOCK_FILE", "DriverLock", "SweepBusyError", "driver_id", "lock_holder"]

LOCK_FILE = ".driver.lock"
SETTLE_S = 2.0  # how long a refused acquire retries: a holder writes its name just after locking


class SweepBusyError(UserError, RuntimeError):
    """Another live driver holds the sweep (the message names it)."""


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def lock_holder(folder: str | os.PathLike) -> str | None:
    """``host:pid started TIME`` of the driver holding ``folder``'s lock, or None when no driver holds it.
    Creates nothing; it tests the lock with a momentary shared flock (an acquirer retries past it)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _text(path) or "a driver that has not written its name yet"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


class DriverLock:
    """The exclusive flock of one sweep folder; ``acquire`` raises ``SweepBusyError`` with ``busy_message``,
    its ``{holder}`` replaced by the holder's text."""

    def __init__(self, folder: str | os.PathLike, busy_message: str = "the sweep is being run by the driver {holder}"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.busy_message = busy_message
        self._fd: int | None = None

    def acquire(self) -> None:
        deadline = time.monotonic() + SETTLE_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # not inherited by Ray's processes
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                holder = _text(self.path) or "a driver that has not written its name yet"
                raise SweepBusyError(self.busy_message.replace("{holder}", holder)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the file was removed and made anew while we waited: lock the current one
        started = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{driver_id()} started {started}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self, *, remove: bool = False) -> None:
        """Unlock (the kernel would do it at exit anyway); ``remove`` also deletes the file, while still
        holding the lock, for a folder this driver created and leaves empty."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if remove:
                self.path.unlink(missing_ok=True)
            else:
                os.ftruncate(fd, 0)
        except OSError:
            pass
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "DriverLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
