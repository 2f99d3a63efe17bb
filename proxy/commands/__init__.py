"""The commands, each imported only when it runs: ``serve``, ``demo`` (and ``emulator``), ``login``, ``token``,
``check`` and ``healthcheck`` (standard library only)."""
