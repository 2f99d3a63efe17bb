"""The commands, each imported only when it runs: ``serve``, ``demo`` (and ``emulator``), ``login``, ``token``,
``check`` and ``healthcheck`` (standard library only)."""

# login's defaults, here so that the command line's parser can show them without importing login.
# Cognito's authorization codes live a few minutes; a person needs a moment to sign in.
DEFAULT_LOGIN_TIMEOUT = 300.0
DEFAULT_REDIRECT_URI = "http://localhost:8001/callback"
DEFAULT_SCOPE = "openid"
