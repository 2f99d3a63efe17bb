"""The grants that turn a credential into tokens.

- ``RefreshTokenGrant``: the refresh_token grant; when Cognito rotates the refresh token, the new one
  is written to its file before the new id/access token is handed out, and the old one is kept until
  the write has succeeded.
- ``ClientCredentialsGrant``: Cognito's machine-to-machine grant (client secret and scopes, no user).

Both re-read their secret files once after Cognito says ``invalid_client``/``invalid_grant``, so a secret
rotated on disk is picked up without a restart.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Protocol

from proxy.errors import PermanentTokenError, TokenError
from proxy.logs import event
from proxy.secrets import FileUseLock, Secret, write_secret_file
from proxy.tokens.endpoint import TokenEndpoint
from proxy.tokens.token import TokenResponse

log = logging.getLogger("proxy.credentials")


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


# How many rotated-out refresh tokens a grant remembers (a kubelet restoring an old Secret brings back one).
MAX_RETIRED = 64


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class Grant(Protocol):
    """Something that obtains a token response (one exchange with the token endpoint)."""

    flow: str
    rotations: int
    persist_failures: int
    persist_error: str | None

    @property
    def shared_warning(self) -> str | None:
        """Another process serves with the same refresh token file (and not through the same token store)."""

    @property
    def endpoint(self) -> TokenEndpoint: ...

    @property
    def refresh_token(self) -> str | None:
        """The refresh token the next refresh uses (None for client_credentials)."""

    @property
    def configured(self) -> str | None:
        """The refresh token as last read from the settings or its file (None for client_credentials)."""

    def adopt(self, refresh_token: str) -> None:
        """Refresh with ``refresh_token`` from now on (the newest one, from a shared store)."""

    async def fetch(self) -> TokenResponse: ...

    def reload(self) -> bool: ...

    def restore(self) -> bool:
        """Values re-read from the files were refused: go back to the previous ones; True if there were any."""
        ...

    def settle(self) -> None:
        """Values re-read from the files worked: forget the previous ones."""
        ...

    def claim(self, sharing: str = "") -> None:
        """Note that this process serves with the credential (``serve``); ``sharing`` names the token store it
        shares the credential through, if any."""

    def release(self) -> None: ...


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
        # Seconds from the rotating answer's arrival to its refresh token being durably in the file: the
        # window in which a crash loses the credential unless Cognito's grace period covers the restart.
        self.last_persist_window: float | None = None
        self._claimed: str | None = None  # what claim() found: another process was there first
        self._said_shared: str | None = None
        self._lock = FileUseLock(refresh_token.path) if refresh_token.path else None
        self._configured = refresh_token.value
        # A durable shared token store keeps rotated refresh tokens: the file is then a second copy, and no file
        # (or a read-only one) no reason to warn.
        self.kept_elsewhere = False
        # Refresh tokens this process rotated away from (digests): a file that brings one back is an old copy.
        self._retired: deque[bytes] = deque(maxlen=MAX_RETIRED)
        self._said_link = False

    def __repr__(self) -> str:
        return f"RefreshTokenGrant(endpoint={self._endpoint!r}, file={self._token.path})"

    def claim(self, sharing: str = "") -> None:
        self._claimed = self._lock.acquire(sharing) if self._lock else None
        _ = self.shared_warning  # said in the log at once

    @property
    def shared_warning(self) -> str | None:
        if self._lock is None:
            return None
        warning = self._claimed or self._lock.contender()
        if warning and warning != self._said_shared:
            log.warning("%s", warning, extra=event("credential_shared"))
        self._said_shared = warning
        return warning

    def release(self) -> None:
        if self._lock:
            self._lock.release()

    @property
    def endpoint(self) -> TokenEndpoint:
        return self._endpoint

    @property
    def refresh_token(self) -> str:
        return self._token.value

    @property
    def configured(self) -> str:
        return self._configured

    def adopt(self, refresh_token: str) -> None:
        if refresh_token != self._token.value:
            self._token.replace(refresh_token)

    def reload(self) -> bool:
        """Re-read the refresh token and client secret files (a person replaced them); True if either changed.

        A new value in the file always wins, even over a rotated token the file could not take (a read-only
        Kubernetes Secret): it is a new login. An old copy coming back (a value this sidecar rotated away from)
        never does."""
        changed_token = self._token.reload(retired=self._was_retired)
        if changed_token:
            if self._unsaved is not None:
                log.warning(
                    "a new refresh token in %s replaces the rotated one this sidecar held in memory only",
                    self._token.path,
                    extra=event("refresh_token_replaced", file=str(self._token.path)),
                )
            self._unsaved = None
            self.persist_error = None
            self._configured = self._token.value
        changed_secret = self._client_secret.reload() if self._client_secret else False
        return changed_token or changed_secret

    def restore(self) -> bool:
        restored = self._token.restore()
        if restored:
            self._configured = self._token.value
        if self._client_secret is not None:
            restored = self._client_secret.restore() or restored
        return restored

    def settle(self) -> None:
        self._token.settle()
        if self._client_secret is not None:
            self._client_secret.settle()

    async def fetch(self) -> TokenResponse:
        _ = self.shared_warning  # a process that started later with the same file is said before each refresh
        if self._persist_pending():
            log.info(
                "the rotated refresh token is now in %s (an earlier write had failed)",
                self._token.path,
                extra=event("refresh_token_persisted", file=str(self._token.path)),
            )
        return await _rereading_files_once(
            lambda: self._endpoint.refresh(self._token.value, self._secret(), on_refresh_token=self._rotate),
            self.reload,
            ("invalid_client", "invalid_grant"),
        )

    def _secret(self) -> str | None:
        return self._client_secret.value if self._client_secret else None

    def _rotate(self, new: str) -> None:
        """Called by the endpoint as soon as an answer's refresh token is read, before the rest is looked at."""
        if new == self._token.value:
            return
        # From here on only the new token works (after Cognito's grace period): memory must follow at once;
        # the file must follow before anything else, and a failed write is retried at every refresh.
        self._retired.append(_digest(self._token.value))
        self._token.replace(new)
        self.rotations += 1
        self._unsaved = new
        if self._persist_pending():
            self.last_persist_window = time.perf_counter() - self._endpoint.last_answer_at
            log.info(
                "refresh token rotated; the new one is in %s (%.1f ms after the answer)",
                self._token.path,
                self.last_persist_window * 1000,
                extra=event(
                    "refresh_token_rotated",
                    persisted=True,
                    file=str(self._token.path),
                    persist_ms=round(self.last_persist_window * 1000, 2),
                ),
            )
        elif self._token.path is None and not self.kept_elsewhere:
            # Said at every rotation, and shown by /-/readyz: each one makes the configured value older.
            self.persist_error = (
                "Cognito rotated the refresh token, which came from SIDECAR_REFRESH_TOKEN, not a file: the new one "
                "is kept in memory only and a restart will fail with invalid_grant. Use SIDECAR_REFRESH_TOKEN_FILE."
            )
            log.warning("%s", self.persist_error, extra=event("refresh_token_rotated", persisted=False, file=None))

    def _persist_pending(self) -> bool:
        """Write a rotated refresh token that is not on disk yet; True when one was written now."""
        if self._unsaved is None or self._token.path is None:
            self._unsaved = None
            return False
        try:
            written = write_secret_file(self._token.path, self._unsaved)
        except OSError as exc:
            if self.kept_elsewhere:
                self._unsaved = None  # the file was only a second copy (a read-only Secret, typically)
                log.info(
                    "the token store keeps the rotated refresh token; %s cannot be written (%s) and keeps the "
                    "configured one, which the store recognises",
                    self._token.path,
                    exc.strerror,
                )
                return False
            self.persist_failures += 1
            self.persist_error = (
                f"the rotated refresh token could not be written to {self._token.path} ({exc.strerror}); it is "
                "kept in memory only, so a restart now would need a new login. Fix the file's directory "
                "permissions or space; the write is retried at every refresh."
            )
            log.error(
                "%s",
                self.persist_error,
                extra=event("refresh_token_persist_failed", file=str(self._token.path), reason=exc.strerror),
            )
            return False
        if written != self._token.path and not self._said_link:
            self._said_link = True
            log.info(
                "%s is a link (a Kubernetes volume's layout): rotated refresh tokens are written to %s and the link "
                "is kept, so a new value the Secret brings is still seen (and wins: it is a new login)",
                self._token.path,
                written,
            )
        self._token.replace(self._unsaved, written=True)
        self._unsaved = None
        self.persist_error = None
        return True

    def _was_retired(self, value: str) -> bool:
        return _digest(value) in self._retired


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
        self.shared_warning: str | None = None

    def __repr__(self) -> str:
        return f"ClientCredentialsGrant(endpoint={self._endpoint!r}, scopes={self._scopes!r})"

    def claim(self, sharing: str = "") -> None:
        """Nothing to guard: client_credentials keeps no rotating state."""

    def release(self) -> None:
        """Nothing held."""

    @property
    def endpoint(self) -> TokenEndpoint:
        return self._endpoint

    @property
    def refresh_token(self) -> None:
        return None

    @property
    def configured(self) -> None:
        return None

    def adopt(self, refresh_token: str) -> None:
        """No refresh token to follow."""

    def reload(self) -> bool:
        return self._client_secret.reload()

    def restore(self) -> bool:
        return self._client_secret.restore()

    def settle(self) -> None:
        self._client_secret.settle()

    async def fetch(self) -> TokenResponse:
        return await _rereading_files_once(
            lambda: self._endpoint.client_credentials(self._scopes, self._client_secret.value),
            self.reload,
            ("invalid_client",),
        )


class NewSecrets:
    """New values in a grant's secret files are tried with the next token request. Refused while the previous
    ones still hold a valid token, the previous ones stay in use, and ``warning`` (readiness), the log and
    ``refused_count`` (metrics) say so until the file changes again."""

    def __init__(self, grant: Grant) -> None:
        self._grant = grant
        self._pending = False
        self.warning: str | None = None
        self.refused_count = 0

    def changed(self) -> None:
        self._pending = True

    def trying(self) -> bool:
        """Whether the token request about to go is the first with new values (once per change)."""
        pending, self._pending = self._pending, False
        return pending

    def worked(self) -> None:
        self._grant.settle()
        self.warning = None

    def refused(self, error: TokenError) -> bool:
        """Cognito refused the new values: go back to the previous ones; False if there were none."""
        if not self._grant.restore():
            return False
        self.refused_count += 1
        said = getattr(error, "error", None) or error.code
        self.warning = (
            f"a new value in a secret file was refused by Cognito ({said}); the previous one is still in use: fix "
            "the file (it is tried again when it changes)"
        )
        log.error("%s", self.warning, extra=event("secret_refused", code=error.code))
        return True
