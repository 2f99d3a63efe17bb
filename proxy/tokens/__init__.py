"""Tokens: what a credential's tokens are, how the token endpoint is asked for them, the grants, the provider
that keeps one credential's tokens fresh, and the fleet's shared refresh (``fleet``, over ``proxy.store``)."""
