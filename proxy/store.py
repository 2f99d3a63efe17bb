"""Shared token stores: where sidecars that share one credential keep it, and the lease that lets one refresh.

A store keeps, per credential key, one sealed blob (the current token set and refresh token, see
``proxy.sealing``) and a lease lock:

- ``acquire`` takes the lease if nobody holds it and hands out a fencing value that grows with every lease;
  it says whether the previous lease ended without a release (its holder died or hung: a takeover);
- ``renew`` extends the lease while the refresh runs, ``save`` writes the blob and ``release`` drops the lease,
  each only if the caller's fencing value still holds it (compare-and-set, compare-and-delete);
- ``hold_off`` leaves a note after a failed refresh, so that the others back off with the one that asked
  instead of each asking the token endpoint in turn.

``RedisStore`` does this with three small Lua scripts (atomic on the server) and a lease that expires;
``FileStore`` with ``flock`` on a lock file: the kernel drops the lock when its holder dies, so it needs no
expiry. Both raise ``StoreError`` when the store cannot be reached or read.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from proxy.errors import StoreError
from proxy.files import write_atomically

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# How long Redis keeps a hold-off note (past the hold itself, so that the fleet's backoff count carries on).
NOTE_KEPT = 86400
# A store operation that takes longer than this has failed: the refresher must be able to fall back or report
# while the token in hand is still valid.
STORE_TIMEOUT = 2.0


@dataclass(frozen=True)
class Lease:
    """A held lease. ``fence`` grows with every lease taken; ``takeover`` says that the previous one ended
    without a release."""

    fence: int
    owner: str
    takeover: bool
    handle: Any = field(default=None, repr=False, compare=False)

    @property
    def value(self) -> str:
        return f"{self.fence} {self.owner}"


def owner_name() -> str:
    """Who holds a lease, for a person reading the store: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Store(Protocol):
    """What the shared refresh needs of a store; ``key`` is a credential's key (``Sealer.key``)."""

    name: str

    async def load(self, key: str) -> tuple[bytes | None, bytes | None]:
        """The sealed token set and the hold-off note (each None when absent)."""

    async def hold_off(self, key: str, note: bytes) -> None:
        """Leave ``note`` (it says until when it holds): the last refresh failed. A saved token set removes it."""

    async def acquire(self, key: str, lease_seconds: float) -> Lease | None: ...

    async def renew(self, key: str, lease: Lease, lease_seconds: float) -> bool: ...

    async def save(self, key: str, lease: Lease, blob: bytes) -> bool: ...

    async def release(self, key: str, lease: Lease) -> None: ...

    async def holder(self, key: str) -> str | None: ...

    async def aclose(self) -> None: ...


# KEYS: lock, fence counter, last released fence. ARGV: owner, lease ms. Returns the fence, negative when the
# previous lease was not released (a takeover), 0 when the lease is held.
_ACQUIRE = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
local fence = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], fence .. ' ' .. ARGV[1], 'px', ARGV[2])
local released = tonumber(redis.call('get', KEYS[3]) or '0')
if fence == 1 or released == fence - 1 then return fence end
return -fence
"""
# KEYS: lock. ARGV: lease value, lease ms.
_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: lock, state, hold-off note. ARGV: lease value, blob. A new token set ends any hold-off.
_SAVE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('set', KEYS[2], ARGV[2])
  redis.call('del', KEYS[3])
  return 1
end
return 0
"""
# KEYS: lock, last released fence. ARGV: lease value, fence.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('del', KEYS[1])
  redis.call('set', KEYS[2], ARGV[2])
  return 1
end
return 0
"""


def redis_display_name(url: str) -> str:
    """The URL without user or password, for logs and errors."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "localhost"
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path or ''}"


class RedisStore:
    """The store in Redis (redis-py's asyncio client). TLS with ``rediss://``; AUTH from the URL or ``password``."""

    def __init__(
        self, url: str, *, password: str | None = None, timeout: float = STORE_TIMEOUT, ca_file: str | None = None
    ) -> None:
        # Imported here: redis-py costs every process about 7 MiB, and only a Redis store needs it.
        import redis.asyncio as aioredis
        import redis.exceptions

        self._redis_error = redis.exceptions.RedisError
        self.name = redis_display_name(url)
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": 30,
        }
        if password is not None:
            options["password"] = password
        if ca_file is not None and url.startswith("rediss://") and "ssl_ca_certs=" not in url:
            options["ssl_ca_certs"] = ca_file  # SIDECAR_CA_FILE: trusted besides the default store
        self._redis: aioredis.Redis = aioredis.from_url(url, **options)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._save = self._redis.register_script(_SAVE)
        self._release = self._redis.register_script(_RELEASE)
        self._owner = owner_name()

    def __repr__(self) -> str:
        return f"RedisStore({self.name!r})"

    @contextlib.asynccontextmanager
    async def _errors(self, doing: str) -> Any:
        try:
            yield
        except self._redis_error as exc:
            raise StoreError(self.name, f"{doing}: {_reason(exc)}") from None
        except OSError as exc:
            raise StoreError(self.name, f"{doing}: {exc.strerror or exc}") from None

    async def load(self, key: str) -> tuple[bytes | None, bytes | None]:
        async with self._errors("reading the token set"):
            state, note = await self._redis.mget([f"{key}:state", f"{key}:hold"])
        return _bytes(state), _bytes(note)

    async def hold_off(self, key: str, note: bytes) -> None:
        async with self._errors("writing the hold-off note"):
            # Kept past its end: the next failure continues the fleet's backoff from its count. A day at most.
            await self._redis.set(f"{key}:hold", note, ex=NOTE_KEPT)

    async def acquire(self, key: str, lease_seconds: float) -> Lease | None:
        async with self._errors("taking the refresh lease"):
            result = int(
                await self._acquire(
                    keys=[f"{key}:lock", f"{key}:fence", f"{key}:released"],
                    args=[self._owner, int(lease_seconds * 1000)],
                )
            )
        if result == 0:
            return None
        return Lease(fence=abs(result), owner=self._owner, takeover=result < 0)

    async def renew(self, key: str, lease: Lease, lease_seconds: float) -> bool:
        async with self._errors("renewing the refresh lease"):
            return bool(await self._renew(keys=[f"{key}:lock"], args=[lease.value, int(lease_seconds * 1000)]))

    async def save(self, key: str, lease: Lease, blob: bytes) -> bool:
        async with self._errors("writing the token set"):
            return bool(await self._save(keys=[f"{key}:lock", f"{key}:state", f"{key}:hold"], args=[lease.value, blob]))

    async def release(self, key: str, lease: Lease) -> None:
        async with self._errors("releasing the refresh lease"):
            await self._release(keys=[f"{key}:lock", f"{key}:released"], args=[lease.value, lease.fence])

    async def holder(self, key: str) -> str | None:
        async with self._errors("reading the refresh lease"):
            value = await self._redis.get(f"{key}:lock")
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    async def aclose(self) -> None:
        await self._redis.aclose()


def _reason(exc: BaseException) -> str:
    """A redis-py error's first line, with the network or TLS error under it when the message lacks it (older
    redis-py says only "Error 1 connecting to host:port. 1.")."""
    text = str(exc).split("\n")[0] or type(exc).__name__
    inner = exc.__cause__ or exc.__context__
    if isinstance(inner, OSError) and str(inner) and str(inner) not in text:
        text = f"{text} ({inner})"
    return text


def _bytes(value: object) -> bytes | None:
    if isinstance(value, str):
        return value.encode()
    return value if isinstance(value, bytes) else None


class FileStore:
    """The store in a directory, for processes on one host or containers sharing a volume.

    Per key: ``<key>.state`` (the sealed blob, 0600), ``<key>.lock`` (held with ``flock`` for the lease),
    ``<key>.fence`` ("issued released") and ``<key>.hold`` (the hold-off note after a failed refresh). Files are
    small and local: they are read and written inline. ``flock`` needs one kernel: one host, or a local volume
    shared by containers (not NFS).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.name = f"file:{directory}"

    def __repr__(self) -> str:
        return f"FileStore({str(self.directory)!r})"

    def prepare(self) -> None:
        """Create the directory (0700) if needed; refuse one that other users may write (they could plant a lease or
        a token set)."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(self.directory)
        except OSError as exc:
            raise StoreError(self.name, f"cannot create the directory ({exc.strerror})") from None
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise StoreError(
                self.name,
                f"the directory has mode {stat.S_IMODE(info.st_mode):04o}: other users could write it; chmod 700 it",
            )

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
            fd = os.open(self._path(key, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
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
            fd = os.open(self._path(key, "lock"), os.O_RDONLY)
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

    async def aclose(self) -> None:
        """Nothing held between calls."""


def open_store(spec: str, *, password: str | None = None, ca_file: str | None = None) -> RedisStore | FileStore | None:
    """The store ``SIDECAR_TOKEN_STORE`` names; ``None`` for ``memory`` (each process on its own). ``ca_file``: a CA
    bundle ``rediss://`` trusts besides the default store, unless its URL names one (``?ssl_ca_certs=``)."""
    if spec == "memory":
        return None
    if spec.startswith(("redis://", "rediss://")):
        return RedisStore(spec, password=password, ca_file=ca_file)
    if spec.startswith("file:"):
        store = FileStore(Path(spec.removeprefix("file:")))
        store.prepare()
        return store
    raise StoreError(spec, "unknown kind of store (memory, file:/dir, redis:// or rediss://)")
