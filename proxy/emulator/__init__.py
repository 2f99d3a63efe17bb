"""The built-in local emulator: Cognito's token endpoint and an API Gateway stage, wired together.

``make_stack`` builds a user pool with one app client and a refresh token, and an API Gateway stand-in
that trusts that pool: everything the demo, the tests and a compose dev stack need.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from proxy.emulator.apigw import ApiGatewayEmulator, fingerprint
from proxy.emulator.cognito import AppClient, CognitoEmulator

__all__ = ["ApiGatewayEmulator", "AppClient", "CognitoEmulator", "EmulatorStack", "fingerprint", "make_stack"]


@dataclass
class EmulatorStack:
    cognito: CognitoEmulator
    apigw: ApiGatewayEmulator
    client: AppClient
    refresh_token: str = field(repr=False)


def make_stack(
    *,
    client_id: str = "emulator-client",
    client_secret: str | None = None,
    public_client: bool = False,
    refresh_token: str | None = None,
    token_lifetime: int = 3600,
    stage: str = "prod",
    rotate_refresh_tokens: bool = False,
    grace_period: float = 0.0,
    machine_to_machine: bool = False,
    api_key: str | None = None,
    api_id: str | None = None,
) -> EmulatorStack:
    """A pool with one app client (a random secret unless given, none if ``public_client``) and its refresh token.

    ``machine_to_machine`` makes it a client_credentials app client with scopes ``api/read api/write`` (and no
    refresh token); ``api_key`` makes the API stage require that ``x-api-key``; ``api_id`` makes it a private API
    reached through a VPC endpoint (403 without ``x-apigw-api-id``).
    """
    cognito = CognitoEmulator(token_lifetime=token_lifetime)
    secret = None if public_client else (client_secret or secrets.token_urlsafe(32))
    if machine_to_machine:
        client = cognito.add_client(
            AppClient(client_id, secret, grants=frozenset({"client_credentials"}), scopes=("api/read", "api/write"))
        )
        token = ""
    else:
        client = cognito.add_client(
            AppClient(
                client_id,
                secret,
                redirect_uris=("http://localhost:8001/callback",),
                rotate_refresh_tokens=rotate_refresh_tokens,
                grace_period=grace_period,
            )
        )
        token = cognito.issue_refresh_token(client_id, value=refresh_token)
    apigw = ApiGatewayEmulator(
        issuer=cognito.issuer,
        public_key=cognito.public_key,
        audiences=[client_id],
        stage=stage,
        api_key=api_key,
        api_id=api_id,
    )
    return EmulatorStack(cognito, apigw, client, token)
