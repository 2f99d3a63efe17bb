"""What the top level and every route have (``Credentialed``: the credential and how the token is sent), and
``RouteSettings``: one route of a multi-API sidecar."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from proxy.egress.tls import TOP_LEVEL_NAMES, TlsFiles
from proxy.guard import FORBIDDEN_METHODS
from proxy.settings.rules import API_ID, HEADER_NAME, METHOD, ROUTE_PREFIX, check_url
from proxy.settings.schema import (
    BOOL,
    PATH,
    SECRET,
    STR,
    Info,
    Model,
    SecretStr,
    field,
    literal,
    optional,
    tuple_of,
    validates,
)


class Credentialed(Model):
    """What the top level and every route have: the credential, and how the token is sent."""

    # Fields are validated in this order: a validator sees the ones above it in ``info.data``.
    allow_insecure: bool = field(
        BOOL, default=False, description="`1` accepts plain `http://` URLs for non-loopback hosts"
    )
    cognito_domain: str | None = field(
        optional(STR),
        default=None,
        description=(
            "e.g. `https://my-app.auth.us-east-1.amazoncognito.com`; the token URL is this plus `/oauth2/token`"
        ),
    )
    # None: the domain's /oauth2/token (see _token_url).
    token_url: str = field(
        STR, default=None, validate_default=True, description="full token endpoint URL, overrides the domain"
    )
    client_id: str = field(STR, min_length=1, description="app client id")
    grant: Literal["refresh_token", "client_credentials"] = field(
        literal("refresh_token", "client_credentials"),
        default="refresh_token",
        description="`refresh_token`, or `client_credentials` for a machine-to-machine app client",
    )
    client_secret: SecretStr | None = field(
        optional(SECRET),
        default=None,
        validate_default=True,
        description="app client secret; absent for a public client",
    )
    client_secret_file: Path | None = field(optional(PATH), None)
    scopes: str = field(
        STR, default="", description="scopes for `client_credentials`, space-separated, e.g. `api/read api/write`"
    )
    refresh_token: SecretStr | None = field(
        optional(SECRET), default=None, validate_default=True, description="the machine credential's refresh token"
    )
    refresh_token_file: Path | None = field(optional(PATH), None)
    # None: what the grant gives (see _token).
    token: Literal["id_token", "access_token"] = field(
        literal("id_token", "access_token"),
        default=None,
        validate_default=True,
        description="`id_token` or `access_token`; by default what the grant gives: `id_token`, or `access_token` with "
        "`client_credentials`",
    )
    api_key: SecretStr | None = field(
        optional(SECRET),
        default=None,
        description="sent as `x-api-key` (API Gateway usage plans), replacing any the client sent",
    )
    api_key_file: Path | None = field(optional(PATH), None)
    header: str = field(STR, default="Authorization", description="header that carries the token")
    header_prefix: str = field(
        STR,
        default="",
        description="text before the token, e.g. `Bearer `; empty: the raw token, as API Gateway's Cognito "
        "authorizer documents",
    )
    # TLS to the upstream: a CA bundle trusted besides the default store, and a client certificate (mutual TLS).
    ca_file: Path | None = field(
        optional(PATH),
        default=None,
        description="PEM bundle of CAs trusted besides the default store: token endpoint, upstream, `rediss://`",
    )
    client_cert_file: Path | None = field(
        optional(PATH), default=None, description="client certificate (PEM) presented to the upstream: mutual TLS"
    )
    client_key_file: Path | None = field(
        optional(PATH), default=None, validate_default=True, description="the client certificate's private key (PEM)"
    )
    client_key_password: SecretStr | None = field(
        optional(SECRET), default=None, description="password of an encrypted client key"
    )
    client_key_password_file: Path | None = field(optional(PATH), None)
    # A private REST API reached through an interface VPC endpoint's DNS name: sent as x-apigw-api-id.
    api_id: str | None = field(
        optional(STR),
        default=None,
        description=(
            "a private REST API's id, sent as `x-apigw-api-id` (the upstream URL is then the VPC endpoint's DNS name)"
        ),
    )

    @validates("api_id")
    @classmethod
    def _api_id(cls, value: str | None) -> str | None:
        if value is not None and not API_ID.fullmatch(value):
            raise ValueError(
                "must be an API Gateway API id: ten lower-case letters and digits, the first label of the API's "
                "execute-api host (e.g. a1b2c3d4e5)"
            )
        return value

    @validates("client_key_file")
    @classmethod
    def _client_pair(cls, value: Path | None, info: Info) -> Path | None:
        if (value is None) != (info.data.get("client_cert_file") is None):
            raise ValueError("the client certificate and its key go together: set both files, or neither")
        return value

    def tls_files(self, names: tuple[str, str, str] | None = None) -> TlsFiles:
        """The TLS files this route (or the top level) uses for its upstream."""
        password = self.client_key_password
        return TlsFiles(
            self.ca_file,
            self.client_cert_file,
            self.client_key_file,
            password.get_secret_value() if password else None,
            names=names or TOP_LEVEL_NAMES,
        )

    @validates("cognito_domain")
    @classmethod
    def _domain(cls, value: str | None, info: Info) -> str | None:
        if value is None:
            return None
        allow = bool(info.data.get("allow_insecure", False))
        return check_url(value, allow_insecure=allow, path_allowed=False)

    @validates("token_url", mode="before")
    @classmethod
    def _token_url(cls, value: Any, info: Info) -> Any:
        if value is None:
            if "cognito_domain" not in info.data:
                return ""  # the domain itself was wrong, and said so: the model fails on that
            domain = info.data["cognito_domain"]
            if domain is None:
                raise ValueError(
                    "is required: set SIDECAR_COGNITO_DOMAIN (e.g. https://my-app.auth.us-east-1.amazoncognito.com) "
                    "or SIDECAR_TOKEN_URL"
                )
            return f"{domain}/oauth2/token"
        if not isinstance(value, str):
            raise ValueError("must be a URL")
        return check_url(value, allow_insecure=bool(info.data.get("allow_insecure", False)))

    @validates("client_secret", mode="before")
    @classmethod
    def _secret(cls, value: Any, info: Info) -> Any:
        if value == "":
            value = None  # an empty secret: a public client
        if value is None and info.data.get("grant") == "client_credentials":
            raise ValueError("is required for client_credentials (or its _FILE variant)")
        return value

    @validates("refresh_token")
    @classmethod
    def _refresh_token(cls, value: SecretStr | None, info: Info) -> SecretStr | None:
        purpose = (info.context or {}).get("purpose", "serve")
        if value is None and info.data.get("grant", "refresh_token") == "refresh_token" and purpose != "login":
            raise ValueError(
                "is required (or its _FILE variant); get one with `cognito-sidecar login`, or use "
                "grant client_credentials for a machine-to-machine app client"
            )
        return value

    @validates("token", mode="before")
    @classmethod
    def _token(cls, value: Any, info: Info) -> Any:
        machine = info.data.get("grant") == "client_credentials"
        if value is None:
            return "access_token" if machine else "id_token"  # no user, no id token
        if machine and value == "id_token":
            raise ValueError("client_credentials gives no id token; use access_token (the default)")
        return value

    @validates("header")
    @classmethod
    def _header(cls, value: str) -> str:
        if not HEADER_NAME.match(value):
            raise ValueError("must be a valid HTTP header name, e.g. Authorization")
        if value.lower() in ("host", "content-length", "transfer-encoding", "connection"):
            raise ValueError(f"{value} is managed by the sidecar and cannot carry the token")
        return value

    @validates("header_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if any(ch in value for ch in "\r\n\0"):
            raise ValueError("must not contain line breaks")
        return value

    def credential_key(self) -> tuple[str, ...]:
        """Routes with the same key share one token cache and one refresh."""
        source = str(self.refresh_token_file or "")
        if not source and self.refresh_token is not None:
            source = hashlib.sha256(self.refresh_token.get_secret_value().encode()).hexdigest()
        scopes = self.scopes if self.grant == "client_credentials" else ""
        return (self.token_url, self.client_id, self.grant, scopes, source)


class RouteSettings(Credentialed):
    """One route of a multi-API sidecar: a path prefix, its upstream, and its credential and header options.

    Anything a route leaves out is taken from the top-level settings (see ``_inherit``). ``methods`` and
    ``paths``, when given, are allowlists: any other method gets 405, any other path 403.
    """

    prefix: str = field(STR)
    upstream_url: str = field(STR)
    strip_prefix: bool = field(BOOL, True)
    methods: tuple[str, ...] | None = field(optional(tuple_of(STR)), None)
    paths: tuple[str, ...] | None = field(optional(tuple_of(STR)), None)

    @validates("upstream_url")
    @classmethod
    def _url(cls, value: str, info: Info) -> str:
        return check_url(value, allow_insecure=bool(info.data.get("allow_insecure", False)))

    @validates("prefix")
    @classmethod
    def _prefix_path(cls, value: str) -> str:
        if not ROUTE_PREFIX.fullmatch(value):
            raise ValueError("must be a plain path starting with /, e.g. /orders")
        if value == "/-" or value.startswith("/-/"):
            raise ValueError("/-/ is reserved for the sidecar's own routes")
        if any(segment in (".", "..") for segment in value.split("/")):
            raise ValueError("must not contain . or .. segments")
        return value.rstrip("/") or "/"

    @validates("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        methods = tuple(method.upper() for method in value)
        for method in methods:
            if not METHOD.match(method):
                raise ValueError(f"{method!r} is not an HTTP method")
            if method in FORBIDDEN_METHODS:
                raise ValueError(f"{method} is never forwarded")
        return methods

    @validates("paths")
    @classmethod
    def _paths(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for pattern in value or ():
            if not pattern.startswith("/"):
                raise ValueError(f"{pattern!r} must start with / (a path as the client sends it, * matches anything)")
        return value


# What a route takes from the top level when it does not say.
INHERITED = tuple(Credentialed.fields)
