"""``cognito-sidecar token``: print a currently valid token, through the token store when the fleet shares one."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from proxy.settings import load_settings
from proxy.tokens.build import one_shot, token_http


async def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    settings = load_settings(env, purpose="token")
    kind = {"id": "id_token", "access": "access_token", None: settings.token}[args.type]
    async with (
        token_http(settings) as http,
        one_shot(settings, http, {kind}) as provider,  # through the token store, if the fleet shares one
    ):
        token = (await provider.get())[kind]
    print(token.value)
    return 0
