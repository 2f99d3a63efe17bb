"""What each Cognito refusal means for the flow in progress: its likely causes and the fix, as the token endpoint's
errors and ``check`` tell them. Imports nothing from the package."""

from __future__ import annotations

# OAuth error codes after which retrying cannot help until a person changes something.
PERMANENT_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)

_BASIC_HINT = (
    "the Basic value must be base64 of client_id:client_secret, encoded once, and the secret must belong to this "
    "app client (a public client has no secret: leave SIDECAR_CLIENT_SECRET unset)"
)

# (error, flow) -> (likely causes, what to do). flow "*" applies to every flow.
EXPLANATIONS: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {
    ("invalid_grant", "refresh"): (
        (
            "the refresh token expired (its life counts from the original sign-in; refreshing or rotation does not "
            "extend it; default 30 days)",
            "it was revoked (sign-out, /oauth2/revoke or an admin action)",
            "it was issued to another app client than SIDECAR_CLIENT_ID",
            "refresh token rotation is on and this token was rotated out after its grace period",
        ),
        "get a new refresh token with `cognito-sidecar login` (the authorization-code flow) and put it in "
        "SIDECAR_REFRESH_TOKEN_FILE, then restart or send SIGHUP.",
    ),
    ("invalid_grant", "login"): (
        (
            "the authorization code was already used or is older than a few minutes",
            "redirect_uri differs from the one in the authorize request, byte for byte (a trailing slash counts)",
            "the code was issued to another app client",
            "the PKCE code_verifier does not match the code_challenge",
        ),
        "run `cognito-sidecar login` again and exchange the new code at once, with the same --redirect-uri.",
    ),
    ("invalid_client", "*"): (
        (
            "SIDECAR_CLIENT_ID or SIDECAR_CLIENT_SECRET is wrong or from another user pool",
            _BASIC_HINT,
            "the app client's secret was rotated and this one was removed",
        ),
        "copy the app client id and secret again from Cognito (App integration > App clients) into "
        "SIDECAR_CLIENT_ID and SIDECAR_CLIENT_SECRET_FILE.",
    ),
    ("unauthorized_client", "*"): (
        (
            "the grant in use is not enabled on the app client (refresh tokens need the "
            "ALLOW_REFRESH_TOKEN_AUTH flow; client_credentials needs that grant and a secret)",
            "the redirect_uri is not registered on the app client (Cognito says error_description=invalid_redirect)",
        ),
        "enable the grant (and the callback URL) on the app client in Cognito, or use the credential it was made for.",
    ),
    ("invalid_request", "*"): (
        (
            "a required form field is missing or malformed",
            "the request did not reach Cognito's /oauth2/token unchanged",
        ),
        "check SIDECAR_TOKEN_URL (or SIDECAR_COGNITO_DOMAIN) points at the user pool domain, with no proxy rewriting "
        "the request.",
    ),
    ("unsupported_grant_type", "*"): (
        ("the endpoint does not know this grant_type", "SIDECAR_TOKEN_URL is not a Cognito token endpoint"),
        "check SIDECAR_TOKEN_URL ends with /oauth2/token on the user pool domain.",
    ),
    ("invalid_scope", "*"): (
        ("a requested scope is not allowed for this app client",),
        "request only scopes enabled on the app client (App client > Hosted UI > Custom scopes).",
    ),
}


def explain(error: str, flow: str) -> tuple[tuple[str, ...], str]:
    """The likely causes and the fix for an OAuth error code during ``flow``."""
    return EXPLANATIONS.get((error, flow)) or EXPLANATIONS.get((error, "*")) or ((), "")
