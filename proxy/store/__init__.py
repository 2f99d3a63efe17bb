"""Shared token stores: where sidecars that share one credential keep it, and the lease that lets one refresh.

Backends only: a store keeps opaque sealed blobs and knows nothing of tokens (``proxy.tokens`` imports this
package, never the reverse). ``base`` says what every store does, ``redis`` and ``file`` do it, and
``open_store`` picks one from ``SIDECAR_TOKEN_STORE``.
"""

from __future__ import annotations

from pathlib import Path

from proxy.errors import StoreError
from proxy.store.file import FileStore
from proxy.store.redis import RedisStore


def open_store(spec: str, *, password: str | None = None, ca_file: str | None = None) -> RedisStore | FileStore | None:
    """The store ``SIDECAR_TOKEN_STORE`` names; ``None`` for ``memory`` (each process on its own). ``ca_file``: a CA
    bundle ``rediss://`` trusts besides the default store, unless its URL names one (``?ssl_ca_certs=``)."""
    if spec == "memory":
        return None
    if spec.startswith(("redis://", "rediss://", "redis+", "rediss+")):
        return RedisStore(spec, password=password, ca_file=ca_file)
    if spec.startswith("file:"):
        store = FileStore(Path(spec.removeprefix("file:")))
        store.prepare()
        return store
    raise StoreError(spec, "unknown kind of store (memory, file:/dir, redis://, redis+sentinel:// or redis+cluster://)")
