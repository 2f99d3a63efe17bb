"""The shared token store in Redis: small Lua scripts (atomic on the server) and a lease that expires.

Three deployments, by URL scheme (``rediss`` for TLS in each):

- ``redis://host:6379/0``: one server (replicas behind it are the operator's business);
- ``redis+sentinel://sentinel1:26379,sentinel2:26379/service[/db]``: the primary Sentinel names for ``service``,
  followed through failovers;
- ``redis+cluster://node:6379``: Redis Cluster (ElastiCache in cluster mode), any node to start from. One
  credential's keys share a hash tag (``{cognito-sidecar:...}:state``), so they live in one slot and the scripts
  that touch several of them run there.
"""

from __future__ import annotations

import contextlib
import urllib.parse
from dataclasses import dataclass
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


SCHEMES = ("redis", "rediss", "redis+sentinel", "rediss+sentinel", "redis+cluster", "rediss+cluster")


@dataclass(frozen=True)
class RedisTarget:
    """What a store URL names: ``kind`` (``single``, ``sentinel`` or ``cluster``), TLS, the hosts, Sentinel's
    service and the database. ``url`` is what redis-py is given for a single server or a cluster node."""

    kind: str
    tls: bool
    hosts: tuple[tuple[str, int], ...]
    service: str
    db: int
    url: str
    name: str  # without user or password: for logs and errors

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        """Raises ``ValueError`` with what is wrong."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {parts.scheme!r} (one of {', '.join(s + '://' for s in SCHEMES)})")
        tls = parts.scheme.startswith("rediss")
        kind = parts.scheme.partition("+")[2] or "single"
        hosts = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            spot = urllib.parse.urlsplit(f"//{item}")
            if not spot.hostname:
                raise ValueError("a Redis URL needs a host, e.g. redis://redis:6379/0")
            hosts.append((spot.hostname, spot.port or (26379 if kind == "sentinel" else 6379)))
        path = [piece for piece in parts.path.split("/") if piece]
        service = ""
        if kind == "sentinel":
            if not path:
                raise ValueError("a Sentinel URL names the service, e.g. redis+sentinel://sentinel:26379/mymaster/0")
            service = path.pop(0)
        if len(hosts) > 1 and kind != "sentinel":
            raise ValueError("only a Sentinel URL lists several hosts (a cluster needs one node to start from)")
        try:
            db = int(path[0]) if path else 0
        except ValueError:
            raise ValueError(f"the database must be a number, not {path[0]!r}") from None
        if kind == "cluster" and db != 0:
            raise ValueError("Redis Cluster has only database 0")
        shown = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in hosts)
        name = f"{parts.scheme}://{shown}/" + "/".join(filter(None, (service, str(db))))
        plain = urllib.parse.urlunsplit(parts._replace(scheme="rediss" if tls else "redis"))
        return cls(kind, tls, tuple(hosts), service, db, plain, name)


class RedisStore:
    """The store in Redis (redis-py's asyncio client). TLS with ``rediss``; AUTH from the URL or ``password``."""

    def __init__(
        self, url: str, *, password: str | None = None, timeout: float = STORE_TIMEOUT, ca_file: str | None = None
    ) -> None:
        # Imported here: redis-py costs every process about 7 MiB, and only a Redis store needs it.
        import redis.exceptions

        self._redis_error = redis.exceptions.RedisError
        target = RedisTarget.parse(url)
        self.name = target.name
        self._tagged = target.kind == "cluster"
        options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
        if password is not None:
            options["password"] = password
        if ca_file is not None and target.tls and "ssl_ca_certs=" not in url:
            options["ssl_ca_certs"] = ca_file  # SIDECAR_CA_FILE: trusted besides the default store
        self._redis, self._sentinels = _client(target, options)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._renew = self._redis.register_script(_RENEW)
        self._save = self._redis.register_script(_SAVE)
        self._release = self._redis.register_script(_RELEASE)
        self._owner = owner_name()

    def __repr__(self) -> str:
        return f"RedisStore({self.name!r})"

    def _k(self, key: str, part: str) -> str:
        """The Redis key of ``key``'s ``part``; in a cluster with ``key`` as hash tag, so that all are in one slot."""
        return f"{{{key}}}:{part}" if self._tagged else f"{key}:{part}"

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
            state, note = await self._redis.mget([self._k(key, "state"), self._k(key, "hold")])
        return _bytes(state), _bytes(note)

    async def hold_off(self, key: str, note: bytes) -> None:
        async with self._errors("writing the hold-off note"):
            # Kept past its end: the next failure continues the fleet's backoff from its count. A day at most.
            await self._redis.set(self._k(key, "hold"), note, ex=NOTE_KEPT)

    async def acquire(self, key: str, lease_seconds: float) -> Lease | None:
        async with self._errors("taking the refresh lease"):
            fence, forced = await self._acquire(
                keys=[self._k(key, "lock"), self._k(key, "fence"), self._k(key, "released")],
                args=[self._owner, int(lease_seconds * 1000)],
            )
        if int(fence) == 0:
            return None
        return Lease(fence=abs(int(fence)), owner=self._owner, takeover=int(fence) < 0, forced=bool(int(forced)))

    async def renew(self, key: str, lease: Lease, lease_seconds: float) -> bool:
        async with self._errors("renewing the refresh lease"):
            return bool(await self._renew(keys=[self._k(key, "lock")], args=[lease.value, int(lease_seconds * 1000)]))

    async def save(self, key: str, lease: Lease, blob: bytes) -> bool:
        async with self._errors("writing the token set"):
            return bool(
                await self._save(
                    keys=[self._k(key, "lock"), self._k(key, "state"), self._k(key, "hold")], args=[lease.value, blob]
                )
            )

    async def release(self, key: str, lease: Lease) -> None:
        async with self._errors("releasing the refresh lease"):
            await self._release(keys=[self._k(key, "lock"), self._k(key, "released")], args=[lease.value, lease.fence])

    async def holder(self, key: str) -> str | None:
        async with self._errors("reading the refresh lease"):
            value = await self._redis.get(self._k(key, "lock"))
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    async def offer(self, key: str, blob: bytes) -> None:
        async with self._errors("offering a token set"):
            pipe = self._redis.pipeline(transaction=False)  # one slot in a cluster; atomicity is not needed
            pipe.hset(self._k(key, "offers"), self._owner, blob)
            pipe.expire(self._k(key, "offers"), int(OFFER_KEPT))
            await pipe.execute()

    async def offers(self, key: str) -> list[bytes]:
        async with self._errors("reading the offered token sets"):
            values = await self._redis.hvals(self._k(key, "offers"))
        return [blob for value in values if (blob := _bytes(value)) is not None]

    async def check_in(self, name: str, value: str, now: float, window: float) -> dict[str, float]:
        async with self._errors("checking the store key"):
            pipe = self._redis.pipeline(transaction=False)
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
        for sentinel in self._sentinels:
            await sentinel.aclose()


def _client(target: RedisTarget, options: dict[str, Any]) -> tuple[aioredis.Redis, list[aioredis.Redis]]:
    """redis-py's client for ``target``: one server, the primary Sentinel names (followed through failovers), or a
    cluster (every command routed to its slot's node); and the Sentinels' own clients, to close with it."""
    import redis.asyncio as aioredis

    if target.kind == "cluster":
        from redis.asyncio.cluster import RedisCluster

        cluster: aioredis.Redis = RedisCluster.from_url(target.url, **options)  # type: ignore[assignment]
        return cluster, []
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(target.url).query))
        tls = {"ssl": True, **{k: v for k, v in query.items() if k.startswith("ssl_")}} if target.tls else {}
        password = options.get("password") or urllib.parse.unquote(urllib.parse.urlsplit(target.url).password or "")
        both = {k: v for k, v in options.items() if k != "password"} | tls
        # The Sentinels themselves are asked without AUTH; the password is the data nodes'.
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=both, **both)
        primary: aioredis.Redis = sentinel.master_for(target.service, db=target.db, password=password or None)
        return primary, list(sentinel.sentinels)
    single: aioredis.Redis = aioredis.from_url(target.url, health_check_interval=30, **options)
    return single, []


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
