"""Credentials: secrets that may live in files, and the grants that turn them into tokens.

- ``Secret``: a value, optionally backed by a file that can be re-read (SIGHUP, or after Cognito says
  ``invalid_client``/``invalid_grant``) so a rotated secret is picked up without a restart.
- ``write_secret_file``: atomic and durable: a temporary file in the same directory, mode 0600, fsync,
  rename, fsync of the directory. A crash at any instant leaves the old or the new content, whole.
- ``RefreshTokenGrant``: the refresh_token grant; when Cognito rotates the refresh token, the new one
  is written to its file before the new id/access token is handed out, and the old one is kept until
  the write has succeeded.
- ``ClientCredentialsGrant``: Cognito's machine-to-machine grant (client secret and scopes, no user).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from proxy.errors import ConfigError, PermanentTokenError
from proxy.settings import RouteSettings, Settings, read_secret_file
from proxy.tokens import TokenEndpoint, TokenResponse

log = logging.getLogger("proxy.credentials")


def write_secret_file(path: Path, value: str) -> None:
    """Replace ``path``'s content with ``value`` atomically and durably, mode 0600."""
    directory = path.parent
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(value + "\n")
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


class Secret:
    """A secret value, optionally re-readable from ``path``. Never shown in a repr."""

    def __init__(self, value: str, path: Path | None = None) -> None:
        self._value = value
        self.path = path

    def __repr__(self) -> str:
        return f"Secret(path={str(self.path) if self.path else None!r})"

    @property
    def value(self) -> str:
        return self._value

    def reload(self) -> bool:
        """Re-read the file; True when the value changed. A missing or empty file keeps the current value."""
        if self.path is None:
            return False
        try:
            fresh = read_secret_file(self.path)
        except OSError as exc:
            log.error("cannot re-read %s (%s); keeping the current value", self.path, exc.strerror)
            return False
        if not fresh or fresh == self._value:
            return False
        self._value = fresh
        log.info("picked up a new value from %s", self.path)
        return True


async def _rereading_files_once(
    exchange: Callable[[], Awaitable[TokenResponse]], reload: Callable[[], bool], errors: tuple[str, ...]
) -> TokenResponse:
    """``exchange()``; if Cognito refuses it with one of ``errors`` and a secret file changed meanwhile (a person
    already fixed it on disk), once more with the new values."""
    try:
        return await exchange()
    except PermanentTokenError as exc:
        if exc.error in errors and reload():
            log.warning("Cognito answered %s; retrying once with the values re-read from disk", exc.error)
            return await exchange()
        raise


class Grant(Protocol):
    """Something that obtains a token response (one exchange with the token endpoint)."""

    flow: str
    rotations: int
    persist_failures: int
    persist_error: str | None

    @property
    def endpoint(self) -> TokenEndpoint: ...

    async def fetch(self) -> TokenResponse: ...

    def reload(self) -> bool: ...


class RefreshTokenGrant:
    """The refresh_token grant over a refresh token that Cognito may rotate."""

    flow = "refresh"

    def __init__(self, endpoint: TokenEndpoint, refresh_token: Secret, client_secret: Secret | None) -> None:
        self._endpoint = endpoint
        self._token = refresh_token
        self._client_secret = client_secret
        self._unsaved: str | None = None
        self.rotations = 0
        self.persist_failures = 0
        self.persist_error: str | None = None

    def __repr__(self) -> str:
        return f"RefreshTokenGrant(endpoint={self._endpoint!r}, file={self._token.path})"

    @property
    def endpoint(self) -> TokenEndpoint:
        return self._endpoint

    @property
    def refresh_token(self) -> str:
        return self._token.value

    def reload(self) -> bool:
        """Re-read the refresh token and client secret files (a person replaced them); True if either changed."""
        if self._unsaved is not None:
            return False  # the file is behind memory: re-reading it would bring back a rotated-out token
        changed_token = self._token.reload()
        changed_secret = self._client_secret.reload() if self._client_secret else False
        return changed_token or changed_secret

    async def fetch(self) -> TokenResponse:
        self._persist_pending()
        response = await _rereading_files_once(
            lambda: self._endpoint.refresh(self._token.value, self._secret()),
            self.reload,
            ("invalid_client", "invalid_grant"),
        )
        if response.refresh_token and response.refresh_token != self._token.value:
            self._rotate(response.refresh_token)
        return response

    def _secret(self) -> str | None:
        return self._client_secret.value if self._client_secret else None

    def _rotate(self, new: str) -> None:
        # From here on only the new token works (after Cognito's grace period): memory must follow at once;
        # the file must follow before anything else, and a failed write is retried at every refresh.
        self._token = Secret(new, self._token.path)
        self.rotations += 1
        self._unsaved = new
        self._persist_pending()

    def _persist_pending(self) -> None:
        if self._unsaved is None or self._token.path is None:
            self._unsaved = None
            return
        try:
            write_secret_file(self._token.path, self._unsaved)
        except OSError as exc:
            self.persist_failures += 1
            self.persist_error = (
                f"the rotated refresh token could not be written to {self._token.path} ({exc.strerror}); it is "
                "kept in memory only, so a restart now would need a new login. Fix the file's directory "
                "permissions or space; the write is retried at every refresh."
            )
            log.error("%s", self.persist_error)
            return
        self._unsaved = None
        self.persist_error = None


class ClientCredentialsGrant:
    """client_credentials: the app client's secret and scopes buy an access token; there is no refresh token."""

    flow = "client_credentials"

    def __init__(self, endpoint: TokenEndpoint, client_secret: Secret, scopes: str) -> None:
        self._endpoint = endpoint
        self._client_secret = client_secret
        self._scopes = scopes
        self.rotations = 0
        self.persist_failures = 0
        self.persist_error: str | None = None

    def __repr__(self) -> str:
        return f"ClientCredentialsGrant(endpoint={self._endpoint!r}, scopes={self._scopes!r})"

    @property
    def endpoint(self) -> TokenEndpoint:
        return self._endpoint

    def reload(self) -> bool:
        return self._client_secret.reload()

    async def fetch(self) -> TokenResponse:
        return await _rereading_files_once(
            lambda: self._endpoint.client_credentials(self._scopes, self._client_secret.value),
            self.reload,
            ("invalid_client",),
        )


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
