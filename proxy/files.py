"""Files that hold secrets or locks: written so that a crash leaves the old content or the new, whole, and opened
so that a link another user planted is never followed. Imports nothing from the package."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path``'s content with ``data`` atomically and durably, mode 0600: a temporary file in the same
    directory, fsync, rename, fsync of the directory."""
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def link_inside(path: Path) -> Path | None:
    """What ``path`` leads to if it is a symbolic link resolving inside its own directory, as a Kubernetes Secret
    or ConfigMap volume lays out its files (``name -> ..data/name``, ``..data -> ..<timestamp>``); else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    return target if target.is_relative_to(path.parent.resolve()) else None


# A lock file is opened without following a symlink, and without leaking into a forked worker's exec.
_OWNED_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC


def open_owned(path: Path, *, create: bool = True) -> int:
    """Open ``path`` for reading and writing (created 0600 if missing and ``create``), only if it is a plain file
    of the sidecar's own user with one name: never through a symlink, never a hard link to another file, never a
    file another user made. Raises ``OSError`` (``ELOOP`` for a symlink, ``EPERM`` for the others) so that a
    caller never truncates or writes a file it does not own."""
    flags = os.O_RDWR | _OWNED_FLAGS | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1:
            whose = "another user's file" if info.st_uid != os.geteuid() else "not a plain file with one name"
            raise PermissionError(errno.EPERM, f"{path} is {whose}: left untouched")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_to_read(path: Path) -> int:
    """Open ``path`` read-only, never through a symlink. Raises ``OSError``."""
    return os.open(path, os.O_RDONLY | _OWNED_FLAGS)
