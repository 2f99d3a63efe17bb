"""Secrets that may live in files: reading, re-reading, writing, and the checks on who else can reach them.

- ``Secret``: a value, optionally backed by a file that can be re-read (SIGHUP, a changed file, or after
  Cognito says ``invalid_client``/``invalid_grant``) so a rotated secret is picked up without a restart.
- ``write_secret_file``: atomic and durable: a temporary file in the same directory, mode 0600, fsync,
  rename, fsync of the directory. A crash at any instant leaves the old or the new content, whole.
- ``exposure`` / ``secret_file_warnings``: secret files other users could read or replace.
- ``FileUseLock``: detects two processes serving with one refresh token file.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.files import link_inside, open_owned, open_to_read, write_atomically

if TYPE_CHECKING:
    from proxy.settings import Settings


log = logging.getLogger("proxy.credentials")


def read_secret_file(path: str | Path) -> str:
    """A secret from a file; Docker and Kubernetes secrets often end with one newline, a token never does."""
    return Path(path).read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")


def write_secret_file(path: Path, value: str) -> Path:
    """Replace ``path``'s content with ``value`` (and a newline) atomically and durably, mode 0600; the file
    written. A link in a Kubernetes volume's layout is written through, never replaced: replacing it would cut
    the file off from the Secret's later updates."""
    target = link_inside(path) or path
    write_atomically(target, (value + "\n").encode())
    return target


class FileUseLock:
    """Advisory locks beside a refresh token file, so that two processes serving with it both know.

    Two processes refreshing with one refresh token invalidate each other once Cognito rotates it (the first
    to refresh retires the token the other holds). The locks only detect that; sharing one credential safely
    is the shared token store's job, so processes that name the same store (``sharing``) are left in peace.

    The first process holds ``.<name>.lock`` exclusively, with "pid host sharing" in it. A later one holds a
    shared lock on ``.<name>.others`` with its own "pid host"; the first finds a live one there by failing to
    take that file exclusively. The kernel drops a dead process's locks: no file needs cleaning up.
    """

    def __init__(self, path: Path) -> None:
        self.path = path.parent / f".{path.name}.lock"
        self.others = path.parent / f".{path.name}.others"
        self._fd: int | None = None
        self._holds = False

    def acquire(self, sharing: str = "") -> str | None:
        """Take the lock; a warning naming the other process if it is held, ``None`` otherwise (also when the
        directory cannot hold a lock file, e.g. a read-only Secret volume)."""
        try:
            fd = open_owned(self.path)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EPERM):
                # A symlink, a hard link or another user's file where the lock belongs: somebody else can write
                # entries in this directory. Nothing is truncated or written through it.
                return (
                    f"{self.path} is a symlink or another user's file, left untouched: other users can create files "
                    f"in {self.path.parent}. Keep the refresh token file in a directory of the sidecar's own (700)."
                )
            log.debug("cannot create %s (%s); another process using the same file goes undetected", self.path, exc)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            words = os.read(fd, 300).decode("ascii", "replace").split()
            os.close(fd)
            pid, host, theirs = (*words, "?", "?", "-")[:3]
            if sharing and theirs == sharing:
                return None  # members of one token store share the file by design
            self._register()
            return (
                f"another process ({_who(pid, host)}) is serving with the refresh token in {self.path.parent}"
                f"{' through another token store or store key' if theirs != '-' else ''}: when Cognito rotates "
                "refresh tokens, each refresh retires the token the other holds and both end with invalid_grant. "
                "Run one sidecar per refresh token file, or share it through one token store."
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {sharing or '-'}".encode())
        self._fd, self._holds = fd, True
        return None

    def _register(self) -> None:
        """Tell the holder this process is here too (a shared lock on the others' file, held while it serves)."""
        try:
            fd = open_owned(self.others)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}".encode())
        except OSError:
            os.close(fd)
            return
        self._fd = fd

    def contender(self) -> str | None:
        """The holder's view: a warning naming a live process that started later with the same file, or None."""
        if not self._holds:
            return None
        try:
            fd = open_to_read(self.others)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, host = (*os.read(fd, 300).decode("ascii", "replace").split(), "?", "?")[:2]
                return (
                    f"another process ({_who(pid, host)}) started with the refresh token in {self.path.parent} and "
                    "serves with it too: when Cognito rotates refresh tokens, each refresh retires the token the "
                    "other holds and both end with invalid_grant. Run one sidecar per refresh token file, or share "
                    "it through one token store."
                )
            except OSError:
                return None
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays for the next start
            self._fd, self._holds = None, False


def _who(pid: str, host: str) -> str:
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"


def exposure(path: Path) -> str | None:
    """Why ``path`` (a secret file) is open to other users, or None: the file readable or writable by group or
    others, or its directory writable by them (they could swap the file). A directory that others may only
    list is fine: /run/secrets is 0755 under Docker and Kubernetes, and names reveal nothing. Group bits count
    only when the group is not the sidecar's own: Kubernetes' fsGroup gives a Secret's files to the pod's group
    (mode 0440), which no other user holds."""
    try:
        info = os.stat(path)
        directory = os.stat(path.parent)
    except OSError:
        return None
    mode = info.st_mode
    others = 0o007 | (0o070 if info.st_gid != os.getegid() else 0)
    problems = []
    if mode & others:
        problems.append(f"{path} has mode {stat.S_IMODE(mode):04o} (other users may read or write it)")
    writers = 0o002 | (0o020 if directory.st_gid != os.getegid() else 0)
    if directory.st_mode & writers and directory.st_mode & stat.S_ISVTX:
        # Sticky, as /tmp: others cannot replace the file, but they can plant names beside it (a lock file's).
        problems.append(f"its directory {path.parent} is a shared directory other users can create files in")
    elif directory.st_mode & writers:
        problems.append(f"its directory {path.parent} is writable by other users")
    if not problems:
        return None
    return (
        "; ".join(problems)
        + ": other users of this machine could take or replace the credential. chmod 600 the file (compose: "
        "a file secret with mode 0400 on the host; Kubernetes: defaultMode 0440 with fsGroup) and 700 its directory."
    )


def secret_files(settings: Settings) -> list[Path]:
    """Every secret file the settings name (top level and routes), each once."""
    paths: dict[Path, None] = {}
    for holder in (settings, *settings.routes):
        for path in (
            holder.client_secret_file,
            holder.refresh_token_file,
            holder.api_key_file,
            holder.client_key_file,
            holder.client_key_password_file,
        ):
            if path is not None:
                paths[Path(path)] = None
    for path in (settings.caller_token_file, settings.egress_proxy_file):
        if path is not None:
            paths[Path(path)] = None
    return list(paths)


def secret_file_warnings(settings: Settings) -> list[str]:
    """``exposure`` of every secret file the settings name."""
    return [warning for path in secret_files(settings) if (warning := exposure(path)) is not None]


class Secret:
    """A secret value, optionally re-readable from ``path``. Never shown in a repr.

    Only a change of the file counts as a new value: ``on_disk`` is what the file held when last read or written,
    so a value in use that the file does not hold (a rotated refresh token that could not be written) is not
    undone by a re-read of the unchanged file."""

    def __init__(self, value: str, path: Path | None = None) -> None:
        self._value = value
        self.path = path
        self._on_disk = value if path is not None else None
        self._previous: str | None = None  # the value before the last re-read, until it is settled
        self._rejected: str | None = None  # a file value the issuer refused: not taken again from the same file

    def __repr__(self) -> str:
        return f"Secret(path={str(self.path) if self.path else None!r})"

    @property
    def value(self) -> str:
        return self._value

    def replace(self, value: str, *, written: bool = False) -> None:
        """Use ``value`` from now on (a rotation, or the shared store's); ``written``: the file holds it now."""
        self._value, self._previous, self._rejected = value, None, None
        if written:
            self._on_disk = value

    def reload(self, *, retired: Callable[[str], bool] | None = None) -> bool:
        """Re-read the file; True when it holds a new value, which is then used. A missing or empty file, an
        unchanged one, and a value ``retired`` says this process already replaced keep the current value."""
        if self.path is None:
            return False
        try:
            fresh = read_secret_file(self.path)
        except OSError as exc:
            log.error("cannot re-read %s (%s); keeping the current value", self.path, exc.strerror)
            return False
        if fresh == self._value and self._rejected is not None:
            self._rejected, self._on_disk = None, fresh  # the value in use again: worth one confirmation
            return True
        if not fresh or fresh in (self._on_disk, self._value, self._rejected):
            self._on_disk = fresh or self._on_disk
            return False
        self._on_disk = fresh
        if retired is not None and retired(fresh):
            log.warning(
                "%s holds a value this sidecar already replaced (an old copy came back); keeping the current one",
                self.path,
            )
            return False
        self._previous, self._value, self._rejected = self._value, fresh, None
        log.info("picked up a new value from %s", self.path)
        return True

    def restore(self) -> bool:
        """The value re-read last was refused: go back to the one before it (True), and do not take the refused
        one from the file again until the file holds another. False when there is nothing to go back to."""
        if self._previous is None:
            return False
        self._rejected, self._value, self._previous = self._value, self._previous, None
        return True

    def settle(self) -> None:
        """The value re-read last works: forget the one before it."""
        self._previous = None


# Linux prctl: whether the process may dump core and be read through /proc/PID/mem by its own user.
_PR_SET_DUMPABLE = 4


def keep_out_of_core_dumps() -> None:
    """Secrets live in this process's memory: no core file may hold them, and (Linux) no other process of the same
    user may read them through ``/proc/PID/mem`` or ptrace. Best effort where the system has neither."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
