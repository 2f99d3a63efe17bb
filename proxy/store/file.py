"""The shared token store in a directory: ``flock`` on a lock file, which the kernel drops when its holder dies,
so the lease needs no expiry."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from proxy.errors import StoreError
from proxy.files import open_owned, open_to_read, write_atomically
from proxy.store.base import OFFER_KEPT, Lease, owner_name

# The directory's own random key (``.sealing-key``, 0600): it seals the records of a credential that has no key
# material of its own (a public client with no ``SIDECAR_TOKEN_STORE_KEY``).
KEY_FILE = ".sealing-key"
KEY_BYTES = 32


class FileStore:
    """The store in a directory, for processes on one host or containers sharing a volume.

    Per key: ``<key>.state`` (the sealed blob, 0600), ``<key>.lock`` (held with ``flock`` for the lease),
    ``<key>.fence`` ("issued released") and ``<key>.hold`` (the hold-off note after a failed refresh); per
    credential, ``<name>.check`` (which keys its members seal with). Files are
    small and local: they are read and written inline. ``flock`` needs one kernel: one host, or a local volume
    shared by containers (not NFS).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"file:{directory}"
        self.key_made = False  # this process made the directory's sealing key (records before it are plaintext)

    def __repr__(self) -> str:
        return f"FileStore({str(self.directory)!r})"

    def prepare(self) -> None:
        """Create the directory (0700) if needed; refuse one the sidecar's user does not own, or that anyone else may
        write, sticky or not: another user could plant a lease, a token set of their choosing, or a link where a
        file belongs."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(self.directory)
        except OSError as exc:
            raise StoreError(self.name, f"cannot create the directory ({exc.strerror})") from None
        if info.st_uid != os.geteuid():
            raise StoreError(
                self.name,
                f"the directory belongs to uid {info.st_uid}, not to this sidecar's user (uid {os.geteuid()}): another "
                "user could plant a token set there. Use a directory of the sidecar's own, e.g. "
                "file:/var/lib/cognito-sidecar",
            )
        if info.st_mode & 0o022:
            raise StoreError(
                self.name,
                f"the directory has mode {stat.S_IMODE(info.st_mode):04o}: other users could write it; chmod 700 it",
            )

    def sealing_key(self) -> bytes:
        """The directory's own random key, made on first use. Raises ``StoreError`` for a key file that is not
        the sidecar user's own private file of the right size."""
        path = self.directory / KEY_FILE
        try:
            made = self._make_key(path)
            fd = open_owned(path, create=False)
        except OSError as exc:
            raise self._wrap(f"opening {KEY_FILE}", exc) from None
        try:
            info = os.fstat(fd)
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if stat.S_IMODE(info.st_mode) & 0o077 or len(key) != KEY_BYTES:
            raise StoreError(
                self.name,
                f"{path} is not a private {KEY_BYTES}-byte key (mode {stat.S_IMODE(info.st_mode):04o}, "
                f"{len(key)} bytes): remove it and the sidecars make a new one (and new tokens)",
            )
        self.key_made = made
        return key

    @staticmethod
    def _make_key(path: Path) -> bool:
        """Make the key file unless it exists: written whole under a temporary name, then linked into place, so
        that sidecars starting together agree on one key. True if this call made it."""
        if os.path.lexists(path):
            return False
        fd, temporary = tempfile.mkstemp(prefix=f"{KEY_FILE}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
            os.link(temporary, path)
        except FileExistsError:
            return False
        finally:
            os.close(fd)
            os.unlink(temporary)
        return True

    def reseal(self, key: str, upgrade: Callable[[bytes], bytes | None]) -> None:
        """Rewrite ``key``'s records with what ``upgrade`` makes of them (None: leave as is)."""
        for suffix in ("state", "hold"):
            blob = self._read(key, suffix)
            new = upgrade(blob) if blob is not None else None
            if new is not None:
                try:
                    write_atomically(self._path(key, suffix), new)
                except OSError as exc:
                    raise self._wrap(f"sealing {self._path(key, suffix).name}", exc) from None

    def _path(self, key: str, suffix: str) -> Path:
        return self.directory / f"{key}.{suffix}"

    def _wrap(self, doing: str, exc: OSError) -> StoreError:
        return StoreError(self.name, f"{doing}: {exc.strerror or exc}")

    async def load(self, key: str) -> tuple[bytes | None, bytes | None]:
        return self._read(key, "state"), self._read(key, "hold")  # the note says until when it holds

    def _read(self, key: str, suffix: str) -> bytes | None:
        try:
            return self._path(key, suffix).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._wrap(f"reading {self._path(key, suffix).name}", exc) from None

    async def hold_off(self, key: str, note: bytes) -> None:
        try:
            write_atomically(self._path(key, "hold"), note)
        except OSError as exc:
            raise self._wrap("writing the hold-off note", exc) from None

    async def acquire(self, key: str, lease_seconds: float) -> Lease | None:
        try:
            fd = open_owned(self._path(key, "lock"))
        except OSError as exc:
            raise self._wrap("opening the lock file", exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except OSError as exc:
            os.close(fd)
            raise self._wrap("locking", exc) from None
        try:
            issued, released = self._fences(key)
            fence = issued + 1
            self._write_fences(key, fence, released)
            owner = owner_name()
            os.ftruncate(fd, 0)
            os.pwrite(fd, owner.encode(), 0)
        except OSError as exc:
            os.close(fd)
            raise self._wrap("counting leases", exc) from None
        return Lease(fence=fence, owner=owner, takeover=issued != released, handle=fd)

    def _fences(self, key: str) -> tuple[int, int]:
        try:
            words = self._path(key, "fence").read_text().split()
            return int(words[0]), int(words[1])
        except FileNotFoundError:
            return 0, 0
        except (ValueError, IndexError):
            return 0, 0  # unreadable: start over; the blob's own version still tells sets apart

    def _write_fences(self, key: str, issued: int, released: int) -> None:
        write_atomically(self._path(key, "fence"), f"{issued} {released}\n".encode())

    async def renew(self, key: str, lease: Lease, lease_seconds: float) -> bool:
        return lease.handle is not None  # a flock lasts as long as its holder: nothing expires

    async def save(self, key: str, lease: Lease, blob: bytes) -> bool:
        if lease.handle is None:
            return False
        try:
            write_atomically(self._path(key, "state"), blob)
            with contextlib.suppress(FileNotFoundError):
                self._path(key, "hold").unlink()  # a new token set ends any hold-off
        except OSError as exc:
            raise self._wrap("writing the token set", exc) from None
        return True

    async def release(self, key: str, lease: Lease) -> None:
        if lease.handle is None:
            return
        try:
            issued, _ = self._fences(key)
            self._write_fences(key, issued, lease.fence)
        except OSError as exc:
            raise self._wrap("releasing the lease", exc) from None
        finally:
            os.close(lease.handle)
            object.__setattr__(lease, "handle", None)

    async def holder(self, key: str) -> str | None:
        try:
            fd = open_to_read(self._path(key, "lock"))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._wrap("reading the lock file", exc) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return os.pread(fd, 256, 0).decode("utf-8", "replace") or "?"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    async def offer(self, key: str, blob: bytes) -> None:
        try:
            write_atomically(self._path(key, f"offer-{owner_name()}"), blob)
        except OSError as exc:
            raise self._wrap("offering a token set", exc) from None

    async def offers(self, key: str) -> list[bytes]:
        found = []
        for path in self.directory.glob(f"{glob.escape(key)}.offer-*"):
            try:
                if time.time() - path.stat().st_mtime <= OFFER_KEPT:
                    found.append(path.read_bytes())
                else:
                    path.unlink()  # expired: a refresh token of the past has no business on disk
            except OSError:
                continue  # withdrawn meanwhile
        return found

    async def check_in(self, name: str, value: str, now: float, window: float) -> dict[str, float]:
        path = self._path(name, "check")
        try:
            seen = json.loads(path.read_bytes())
            values = {str(k): float(v) for k, v in seen.items()} if isinstance(seen, dict) else {}
        except FileNotFoundError:
            values = {}
        except (ValueError, TypeError):
            values = {}  # unreadable: start over, every member writes its own again
        except OSError as exc:
            raise self._wrap(f"reading {path.name}", exc) from None
        values = {k: at for k, at in values.items() if now - at <= window} | {value: now}
        try:
            write_atomically(path, json.dumps(values).encode())
        except OSError as exc:
            raise self._wrap(f"writing {path.name}", exc) from None
        return values

    async def aclose(self) -> None:
        """Nothing held between calls."""
