"""A run's output folder: one run at a time, its config written once and atomically, exports kept out of it.

A run's folder holds the only record of how it was configured (config.yaml), its checkpoints and its metrics. Three
things protect them:

- `RunLock`: an exclusive `flock` on `<output_dir>/.jaxlora.lock` for the run's whole life. A second run on the same
  folder is refused with one line naming the holder (pid, host, start time). The kernel drops the lock when the
  holding process dies, even by kill -9, so a killed run never leaves a stale lock behind.
- config.yaml is written atomically (`jaxlora.io.atomic.write_atomically`: a full disk or a crash leaves the previous
  file, never a 0-byte one), and only once the run is accepted (lock held, checkpoint compatible); each checkpoint
  keeps the config it was made with in its meta item.
- `check_export_target`: an export (`jaxlora export --out`, possibly with `--overwrite`) may not land on, inside or
  above the run's checkpoints or the base model, which the overwrite would delete.

`disk_full_message` turns a "no space left on device" anywhere in an exception chain (orbax's background writers wrap
it several layers deep) into one line naming the path and the free space.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import time
from pathlib import Path

LOCK_FILE = ".jaxlora.lock"


class RunFolderError(ValueError):
    """A user error about the output folder (in use, an export onto the run): one line, exit code 2."""


class RunLock:
    """Holds an exclusive lock on a run's output folder until `release` (or the process ends)."""

    def __init__(self, folder: str | os.PathLike):
        import fcntl
        self.path = Path(folder) / LOCK_FILE
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self._fd)
            raise RunFolderError(f"{Path(folder)} is in use by another jaxlora run ({holder}); wait for it to finish "
                                 f"or choose another train.output_dir") from None
        except OSError as e:  # a filesystem without flock (some network mounts): run, but say it is unprotected
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            import logging
            logging.getLogger("jaxlora").warning("cannot lock %s (%s): a second run on this folder would not be "
                                                 "refused", folder, e.strerror)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())

    def _holder(self) -> str:
        try:
            return os.pread(self._fd, 200, 0).decode(errors="replace").strip() or "holder unknown"
        except OSError:
            return "holder unknown"

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new holder)
            self._fd = None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_export_target(out: str | os.PathLike, protected: dict[str, str | os.PathLike]) -> None:
    """Refuses an export folder that is, contains or lies inside one of `protected` ({what: path})."""
    target = Path(out).expanduser().resolve()
    for what, path in protected.items():
        keep = Path(path).expanduser().resolve()
        if _within(target, keep) or _within(keep, target):
            relation = "is" if target == keep else "is inside" if _within(target, keep) else "contains"
            raise RunFolderError(f"export --out {out} {relation} {what} ({keep}); writing there (with --overwrite) "
                                 f"would delete it: choose a folder outside it")


def _chain(err: BaseException):
    """`err` and every exception it was raised from or during (and an ExceptionGroup's members), once each."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def disk_full_message(err: BaseException, fallback_path=None) -> str | None:
    """One line for a full disk anywhere in `err`'s chain (the path written, its filesystem's free space), or None.
    `fallback_path` names the place when the error does not: a path, or a function returning one (called only for a
    full disk, so a caller need not work it out for every other error)."""
    for e in _chain(err):
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or \
            "No space left on device" in str(e) or "Disk quota exceeded" in str(e)
        if full:
            path = getattr(e, "filename", None) or (fallback_path() if callable(fallback_path) else fallback_path) \
                or "."
            return f"no space left on the device holding {path} ({_free_space(path)}); free some space or " \
                   f"write elsewhere. Checkpoints already completed are intact"
    return None


def _free_space(path: str | os.PathLike) -> str:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
