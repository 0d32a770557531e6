"""An exclusive lock on a study's output folder, naming its holder.

``OUT/study.lock`` holds the holder's pid, host and start time (JSON) and is
``flock``-ed while the study runs, so the kernel releases it when the holder
dies, even by SIGKILL. A second process is refused with the holder's name. A
lock file left by a process that is gone (its ``flock`` free, on this host) is
stale: it is taken over with a warning. One recorded on another host is
refused, since this host cannot tell whether that process still runs (the
message says which file to delete). On file systems without ``flock`` (some
NFS mounts) a holder on this host counts as gone when its pid is not running.

Standard library only: the lock can be taken and tested without JAX.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import pathlib
import socket
import warnings

LOCK = "study.lock"


class LockHeld(RuntimeError):
    """Another process holds the folder; the message names it."""


@dataclasses.dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str  # ISO 8601, UTC

    @classmethod
    def me(cls) -> Holder:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        return cls(os.getpid(), socket.gethostname(), now)

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}"

    def running(self) -> bool:
        """Whether the pid runs on this host (the holder's host must be this one)."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process
            return True
        return True


def _read(descriptor: int) -> Holder | None:
    """The holder recorded in an open lock file; None if empty or unreadable (a
    process killed before it wrote its name)."""
    os.lseek(descriptor, 0, os.SEEK_SET)
    data = b""
    while chunk := os.read(descriptor, 4096):
        data += chunk
    try:
        fields = json.loads(data)
        return Holder(int(fields["pid"]), str(fields["host"]), str(fields["started"]))
    except (ValueError, KeyError, TypeError):
        return None


def _flock(descriptor: int) -> bool | None:
    """Take the kernel lock: True, False if another open file holds it, None if
    the file system has no locks."""
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            return None
        raise
    return True


class FolderLock:
    """The lock of one folder, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        self.path = self.folder / LOCK
        self._descriptor: int | None = None

    def _refuse(self, holder: Holder | None, why: str = "") -> LockHeld:
        who = str(holder) if holder else "another process (which has not written its name yet)"
        return LockHeld(
            f"output folder {self.folder} is in use by {who}{why}. Wait for it to finish or use another --out "
            f"folder; two runs must not share one folder."
        )

    def acquire(self) -> FolderLock:
        """Take the lock or raise :class:`LockHeld` naming the holder."""
        me = Holder.me()
        while True:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _flock(descriptor)
                previous = _read(descriptor)
                if locked is False:
                    raise self._refuse(previous)
                # A holder releasing the lock unlinks the file: lock the file at the path, not an old one.
                try:
                    if os.fstat(descriptor).st_ino != os.stat(self.path).st_ino:
                        os.close(descriptor)
                        continue
                except FileNotFoundError:
                    os.close(descriptor)
                    continue
                if previous is not None:
                    self._check_stale(previous, kernel_lock=locked is True)
                os.ftruncate(descriptor, 0)
                os.lseek(descriptor, 0, os.SEEK_SET)
                os.write(descriptor, json.dumps(dataclasses.asdict(me)).encode())
                os.fsync(descriptor)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(descriptor)
                raise
            self._descriptor = descriptor
            return self

    def _check_stale(self, previous: Holder, kernel_lock: bool) -> None:
        """Raise unless the recorded holder is gone; warn that its lock is taken over."""
        if previous.host != socket.gethostname():
            raise self._refuse(
                previous,
                f" according to {self.path}; from this host it cannot be told whether that process still "
                "runs. If it does not, delete that file",
            )
        if not kernel_lock and previous.running():
            raise self._refuse(previous)
        gone = "is no longer running" if not previous.running() else "no longer holds it"
        warnings.warn(
            f"{self.path}: taking over a stale lock of {previous} (that process {gone})",
            RuntimeWarning,
            stacklevel=4,
        )

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def release(self) -> None:
        """Remove the lock file and let go (unlinked first, so no one locks the old file)."""
        if self._descriptor is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._descriptor)
        self._descriptor = None
