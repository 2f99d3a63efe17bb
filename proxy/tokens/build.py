"""Token providers from settings: the token endpoint client, the grant and, with a shared token store, the store
side of the credential.

The app builds one provider per credential with ``provider_for``; the one-shot commands (``token``, ``check``) use
``one_shot``. Those go through the store too: a refresh outside it would rotate a shared refresh token out from
under every sidecar that shares it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

import httpx2

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.egress.tls import TlsContext, TlsFiles
from proxy.egress.transport import token_client
from proxy.errors import ConfigError, StoreError
from proxy.secrets import Secret
from proxy.settings import RouteSettings, Settings
from proxy.store import open_store
from proxy.store.base import Store
from proxy.store.file import FileStore
from proxy.tokens.endpoint import TokenEndpoint
from proxy.tokens.fleet import SharedRefresh
from proxy.tokens.grants import ClientCredentialsGrant, RefreshTokenGrant
from proxy.tokens.provider import TokenProvider
from proxy.tokens.schedule import RefreshPolicy
from proxy.tokens.sealed import Sealer


def grant_from_settings(
    settings: Settings | RouteSettings, endpoint: TokenEndpoint
) -> RefreshTokenGrant | ClientCredentialsGrant:
    """The grant the settings describe, over ``endpoint``."""
    secret = (
        Secret(settings.client_secret.get_secret_value(), settings.client_secret_file)
        if settings.client_secret is not None
        else None
    )
    if settings.grant == "client_credentials":
        if secret is None:
            raise ConfigError(["SIDECAR_CLIENT_SECRET: required for client_credentials"])
        return ClientCredentialsGrant(endpoint, secret, settings.scopes)
    if settings.refresh_token is None:
        raise ConfigError(["SIDECAR_REFRESH_TOKEN: is required (or SIDECAR_REFRESH_TOKEN_FILE)"])
    refresh = Secret(settings.refresh_token.get_secret_value(), settings.refresh_token_file)
    return RefreshTokenGrant(endpoint, refresh, secret)


def token_tls(settings: Settings) -> TlsContext | None:
    """The token endpoints' TLS context: the default store plus ``SIDECAR_CA_FILE`` (None: the default store)."""
    return TlsContext(TlsFiles(ca_file=settings.ca_file)) if settings.ca_file is not None else None


def token_http(settings: Settings, tls: TlsContext | None = None) -> httpx2.AsyncClient:
    """The HTTP client for token endpoints: through the egress proxy, trusting ``SIDECAR_CA_FILE`` (``tls``, if the
    caller keeps it to re-read it)."""
    return token_client(settings.egress, tls or token_tls(settings), timeout=settings.token_timeout)


def open_configured_store(settings: Settings) -> Store | None:
    """The store ``SIDECAR_TOKEN_STORE`` names (None for ``memory``); no connection is made yet."""
    password = settings.token_store_password
    try:
        return open_store(
            settings.token_store,
            password=password.get_secret_value() if password else None,
            ca_file=str(settings.ca_file) if settings.ca_file else None,
        )
    except StoreError as exc:
        raise ConfigError([f"SIDECAR_TOKEN_STORE: {exc.reason}"]) from None


def endpoint_for(settings: Settings, credential: Settings | RouteSettings, http: httpx2.AsyncClient) -> TokenEndpoint:
    """The token endpoint client of ``credential`` (the top level or a route), through the egress proxy its URL
    calls for."""
    return TokenEndpoint(
        http,
        token_url=credential.token_url,
        client_id=credential.client_id,
        timeout=settings.token_timeout,
        proxy=settings.egress.proxy_for(credential.token_url),
    )


def provider_for(
    settings: Settings,
    credential: Settings | RouteSettings,
    http: httpx2.AsyncClient,
    *,
    kinds: Iterable[str],
    store: Store | None,
    policy: RefreshPolicy | None = None,
    clock: Clock = SYSTEM_CLOCK,
    durable: bool = True,
) -> TokenProvider:
    """The provider of ``credential``'s tokens. ``durable``: the store keeps rotated refresh tokens across restarts
    (not so the private one ``SIDECAR_WORKERS`` makes and removes)."""
    grant = grant_from_settings(credential, endpoint_for(settings, credential, http))
    shared = None
    if store is not None:
        sealer = sealer_for(settings, credential, store)
        if isinstance(grant, RefreshTokenGrant):
            grant.kept_elsewhere = durable
        shared = SharedRefresh(store, sealer, grant, lease_seconds=settings.token_store_lease, clock=clock)
    return TokenProvider(
        grant,
        kinds=kinds,
        margin=settings.refresh_margin,
        wait_limit=settings.token_timeout,
        policy=policy,
        clock=clock,
        shared=shared,
    )


def identity_of(credential: Settings | RouteSettings) -> str:
    """What tells one credential from another in a store: token URL, client id, grant and (for client_credentials)
    scopes."""
    scopes = credential.scopes if credential.grant == "client_credentials" else ""
    return "\n".join((credential.token_url, credential.client_id, credential.grant, scopes))


def sealer_for(settings: Settings, credential: Settings | RouteSettings, store: Store) -> Sealer:
    """The seal of ``credential``'s records: from its identity and the key material (see proxy.tokens.sealed)."""
    identity = identity_of(credential)
    material = settings.token_store_key or credential.client_secret
    if material is not None:
        return Sealer(identity, material.get_secret_value().encode())
    if not isinstance(store, FileStore):
        return Sealer(identity, None)  # SIDECAR_TOKEN_STORE_PLAINTEXT
    try:
        sealer = Sealer(identity, None, local_key=store.sealing_key())
        if store.key_made:
            store.reseal(sealer.key, sealer.upgrade)  # records from before the store had a key
    except StoreError as exc:
        raise ConfigError([f"SIDECAR_TOKEN_STORE: {exc.reason}"]) from None
    return sealer


@contextlib.asynccontextmanager
async def one_shot(settings: Settings, http: httpx2.AsyncClient, kinds: Iterable[str]) -> AsyncIterator[TokenProvider]:
    """A running provider of the top-level credential, through the configured store, for one command."""
    store = open_configured_store(settings)
    provider = provider_for(settings, settings, http, kinds=kinds, store=store)
    provider.start()
    try:
        yield provider
    finally:
        await provider.aclose()
        if store is not None:
            await store.aclose()
