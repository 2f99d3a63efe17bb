"""The shared token store in Redis: three small Lua scripts (atomic on the server) and a lease that expires."""

from __future__ import annotations

import contextlib
import urllib.parse
from typing import TYPE_CHECKING, Any

from proxy.errors import StoreError
from proxy.store.base import OFFER_KEPT, STORE_TIMEOUT, Lease, owner_name

# How long Redis keeps a hold-off note (past the hold itself, so that the fleet's backoff count carries on).
NOTE_KEPT = 86400

if TYPE_CHECKING:
    import redis.asyncio as aioredis


# KEYS: lock, fence counter, last released fence. ARGV: owner, lease ms. Returns the fence (negative when the
# previous lease was not released: a takeover; 0 when the lease is held) and 1 when a lock no sidecar sets (no
# expiry, or one longer than two leases) was removed first, else 0.
_ACQUIRE = """
local forced = 0
if redis.call('exists', KEYS[1]) == 1 then
  local ttl = redis.call('pttl', KEYS[1])
  if ttl >= 0 and ttl <= 2 * tonumber(ARGV[2]) then return {0, 0} end
  redis.call('del', KEYS[1])
  forced = 1
end
local fence = redis.call('incr', KEYS[2])
redis.call('set', KEYS[1], fence .. ' ' .. ARGV[1], 'px', ARGV[2])
local released = tonumber(redis.call('get', KEYS[3]) or '0')
if fence == 1 or released == fence - 1 then return {fence, forced} end
return {-fence, forced}
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
            fence, forced = await self._acquire(
                keys=[f"{key}:lock", f"{key}:fence", f"{key}:released"],
                args=[self._owner, int(lease_seconds * 1000)],
            )
        if int(fence) == 0:
            return None
        return Lease(fence=abs(int(fence)), owner=self._owner, takeover=int(fence) < 0, forced=bool(int(forced)))

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

    async def offer(self, key: str, blob: bytes) -> None:
        async with self._errors("offering a token set"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(f"{key}:offers", self._owner, blob)
            pipe.expire(f"{key}:offers", int(OFFER_KEPT))
            await pipe.execute()

    async def offers(self, key: str) -> list[bytes]:
        async with self._errors("reading the offered token sets"):
            values = await self._redis.hvals(f"{key}:offers")
        return [blob for value in values if (blob := _bytes(value)) is not None]

    async def check_in(self, name: str, value: str, now: float, window: float) -> dict[str, float]:
        async with self._errors("checking the store key"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(name, value, repr(now))
            pipe.hgetall(name)
            pipe.expire(name, max(1, int(window)))
            _, seen, _ = await pipe.execute()
            values = {_text(k): float(v) for k, v in seen.items()}
            stale = [k for k, at in values.items() if now - at > window]
            if stale:
                await self._redis.hdel(name, *stale)
        return {k: at for k, at in values.items() if k not in stale}

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


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _bytes(value: object) -> bytes | None:
    if isinstance(value, str):
        return value.encode()
    return value if isinstance(value, bytes) else None
