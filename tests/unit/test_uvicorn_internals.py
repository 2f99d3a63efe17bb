"""The parts of uvicorn's internals the sidecar builds on, named, so that an upgrade that changes them fails
here, loudly, rather than somewhere in the forwarding tests.

``proxy/server/coalesce.py`` wraps the transport of uvicorn's httptools protocol, and ``proxy/server/limits.py``
subclasses that protocol (parser callbacks, keep-alive timer, pipelining) to enforce the connection limits.
pyproject.toml bounds uvicorn below the next minor version; before raising the bound, check that these still
hold and that the real-server tests pass.
"""

from __future__ import annotations

import inspect

import httptools
import pytest
from uvicorn import Server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

# What limits.py and coalesce.py call, override or read.
PROTOCOL_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "eof_received",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_response_complete",
    "_unset_keepalive_if_required",
    "_should_upgrade",
    "handle_websocket_upgrade",
    "_unsupported_upgrade_warning",
    "timeout_keep_alive_handler",
)
PROTOCOL_ATTRIBUTES = (
    "parser",
    "transport",
    "cycle",
    "connections",
    "loop",
    "flow",
    "headers",
    "scope",
    "client",
    "pipeline",
    "timeout_keep_alive",
    "timeout_keep_alive_task",
)
CYCLE_ATTRIBUTES = ("response_complete", "keep_alive", "body", "more_body", "message_event")
# What proxy/server/serving.py's embedded server overrides or calls (its main loop wakes on stop()).
SERVER_METHODS = ("main_loop", "on_tick", "capture_signals", "serve", "shutdown")


def test_the_httptools_protocol_still_has_what_the_sidecar_overrides_and_reads():
    missing = [name for name in PROTOCOL_METHODS if not callable(getattr(HttpToolsProtocol, name, None))]
    assert not missing, f"uvicorn's HttpToolsProtocol lost {missing}: proxy/server/limits.py and coalesce.py need work"
    init = inspect.getsource(HttpToolsProtocol.__init__) + inspect.getsource(HttpToolsProtocol.connection_made)
    gone = [name for name in PROTOCOL_ATTRIBUTES if f"self.{name}" not in init]
    assert not gone, f"uvicorn's HttpToolsProtocol no longer sets {gone}"
    cycle = inspect.getsource(RequestResponseCycle.__init__)
    gone = [name for name in CYCLE_ATTRIBUTES if f"self.{name}" not in cycle]
    assert not gone, f"uvicorn's RequestResponseCycle no longer sets {gone}"


def test_the_server_still_has_the_main_loop_the_embedded_server_replaces():
    missing = [name for name in SERVER_METHODS if not callable(getattr(Server, name, None))]
    assert not missing, f"uvicorn's Server lost {missing}: proxy/server/serving.py needs work"
    shutdown = inspect.getsource(Server.shutdown)
    assert "if not self.force_exit" in shutdown and "self.lifespan.shutdown()" in shutdown, (
        "uvicorn's Server.shutdown changed: check GracefulServer.shutdown's second-signal path"
    )
    main_loop = inspect.getsource(Server.main_loop)
    assert "await self.on_tick(counter)" in main_loop and "asyncio.sleep(0.1)" in main_loop, (
        "uvicorn's Server.main_loop changed: compare _EmbeddedServer.main_loop with it"
    )


def test_the_parser_reports_what_the_limits_rely_on():
    # connection.py reads the cause of a callback failure from __context__, and stops at upgrades.
    class Refuse(Exception):
        pass

    class Callbacks:
        def on_header(self, name: bytes, value: bytes) -> None:
            raise Refuse

    parser = httptools.HttpRequestParser(Callbacks())
    with pytest.raises(httptools.HttpParserError) as failure:
        parser.feed_data(b"GET / HTTP/1.1\r\nA: b\r\n\r\n")
    assert isinstance(failure.value.__context__, Refuse)
    parser = httptools.HttpRequestParser(object())
    with pytest.raises(httptools.HttpParserUpgrade):
        parser.feed_data(b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
