"""Logging: every line in one format (``SIDECAR_LOG_FORMAT``: text or json) on stderr, UTC ISO 8601 times, the
request id on every line written while a request is handled, and an access log that stays off the hot path.

Every line, in JSON (one object per line; docs/operations.md lists the fields):

- ``time`` (``2026-12-02T11:42:35.123Z``), ``level``, ``logger``, ``message``;
- ``request_id`` when the line is about a request (``proxy.request.CURRENT_REQUEST_ID``);
- ``event`` and its fields for the events an operator acts on (token refreshed, refresh failed with its
  Cognito error code and the retry's attempt and wait, refresh token rotated or not persisted, ...): passed as
  ``extra=event(name, **fields)``. In text they are already in the message.

The stdlib ``logging`` path (record, formatter, handler lock, a flushed write per line) cost 25-60
microseconds per request in the benchmark, a quarter of the whole request, so the access log does not use
it: ``AccessLog`` builds each line with one f-string, in either format, keeps it in memory, and writes the
batch at most every ``ACCESS_FLUSH_INTERVAL`` seconds or every ``ACCESS_BUFFER_LINES`` lines. Lines never
carry headers, so never a token; the query string (which can carry personal data) only when asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Iterable
from json.encoder import encode_basestring_ascii as json_string
from typing import Any, Literal, TextIO

from proxy.request import CURRENT_REQUEST_ID, RequestRecord
from proxy.types import Scope

LogFormat = Literal["text", "json"]
# Lines a busy sidecar gathers before writing them out in one go.
ACCESS_BUFFER_LINES = 256
# An idle sidecar's access lines still appear within this many seconds.
ACCESS_FLUSH_INTERVAL = 1.0
# A path longer than this is cut in the log line (the request itself is untouched).
ACCESS_MAX_TARGET = 300
# Loggers whose lines say less than the sidecar's own events, at this level unless SIDECAR_LOG_LEVELS says
# otherwise: httpx2 logs every token request at INFO, beside the sidecar's ``token_refreshed``.
QUIET_LOGGERS = {"httpx2": "warning"}
# The LogRecord attribute that ``event`` fills.
_EVENT = "sidecar_event"


# ".000Z" to ".999Z": looked up, not formatted, for every line.
_MILLISECONDS = tuple(f".{ms:03d}Z" for ms in range(1000))


class _Stamps:
    """UTC ISO 8601 times to the millisecond; the part up to the second (``prefix``, of ``second``) is formatted
    once per second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def __call__(self, now: float) -> str:
        second = int(now)
        if second != self.second:
            self.advance(second)
        return self.prefix + _MILLISECONDS[int((now - second) * 1000)]

    def advance(self, second: int) -> None:
        self.second = second
        self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


# With tracing on, the current span's (trace id, span id) in hex, or None outside a span (``set_trace_ids``).
_trace_ids: Callable[[], tuple[str, str] | None] | None = None


def set_trace_ids(source: Callable[[], tuple[str, str] | None] | None) -> None:
    """JSON lines carry ``trace_id`` and ``span_id`` from ``source`` (the tracer's), or none (``None``)."""
    global _trace_ids
    _trace_ids = source


def event(name: str, **fields: object) -> dict[str, Any]:
    """``extra=`` for a log call that is an event: in JSON lines, ``event`` is ``name`` and the fields follow."""
    return {_EVENT: (name, fields)}


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>: <message> [request_id=<id>]``, then the traceback if any."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Stamps()

    def format(self, record: logging.LogRecord) -> str:
        request_id = CURRENT_REQUEST_ID.get()
        line = f"{self._stamp(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        if request_id:
            line += f" request_id={request_id}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Stamps()

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": self._stamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = CURRENT_REQUEST_ID.get()
        if request_id:
            data["request_id"] = request_id
        if _trace_ids is not None and (ids := _trace_ids()) is not None:
            data["trace_id"], data["span_id"] = ids
        happened = getattr(record, _EVENT, None)
        if happened is not None:
            name, fields = happened
            data["event"] = name
            data.update((key, value) for key, value in fields.items() if key not in data)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str, separators=(",", ":"))


class _AnsweredBySidecar(logging.Filter):
    """Drops uvicorn's line for a response the app left unfinished on purpose: the forwarder does that when the
    upstream broke off mid-body (so the client sees a broken answer, not a truncated one that looks whole),
    and logs its own line saying so."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != "ASGI callable returned without completing response."


_ANSWERED_BY_SIDECAR = _AnsweredBySidecar()


def quiet_uvicorn() -> None:
    """Install the filter above on uvicorn's error logger (idempotent)."""
    logging.getLogger("uvicorn.error").addFilter(_ANSWERED_BY_SIDECAR)


def configure_logging(level: str, log_format: LogFormat = "text", levels: Iterable[tuple[str, str]] = ()) -> None:
    """Log to stderr at ``level`` in ``log_format``, with the single loggers of ``levels`` (name, level) at their
    own. uvicorn's own access log stays off: ``AccessLog`` replaces it; its other lines (and every library's)
    take the same format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for name, own in (*QUIET_LOGGERS.items(), *levels):
        logging.getLogger(name).setLevel(own.upper())


class AccessLog:
    """One line per request, in ``log_format``; buffered (see the module docstring). ``query``: whether the query
    string is logged. ``exclude``: path prefixes whose 1xx-3xx answers get no line; ``sample``: the share of the
    other 1xx-3xx answers that get one. An error (4xx, 5xx, or an answer cut off) always gets its line."""

    def __init__(
        self,
        log_format: LogFormat = "text",
        *,
        query: bool = False,
        exclude: tuple[str, ...] = (),
        sample: float = 1.0,
        stream: TextIO | None = None,
    ) -> None:
        self._stream = stream
        self._lines: list[str] = []
        self._stamp = _Stamps()
        self._query = query
        self._exclude = exclude
        self._sample = sample
        self._line = self._json_line if log_format == "json" else self._text_line

    def record(self, scope: Scope, record: RequestRecord, seconds: float) -> None:
        """Note one request, ``seconds`` after its head arrived."""
        if (
            record.status < 400
            and not record.error
            and (
                (self._exclude and scope["path"].startswith(self._exclude))
                or (self._sample < 1.0 and random.random() >= self._sample)  # noqa: S311
            )
        ):
            return
        # What both formats need, worked out here once, inline: this runs for every request.
        now = time.time()
        second = int(now)
        stamps = self._stamp
        if second != stamps.second:
            stamps.advance(second)
        stamp = stamps.prefix + _MILLISECONDS[int((now - second) * 1000)]
        raw: bytes = scope.get("raw_path") or scope["path"].encode()
        path = (
            raw.decode("latin-1")
            if len(raw) <= ACCESS_MAX_TARGET
            else raw[:ACCESS_MAX_TARGET].decode("latin-1") + "..."
        )
        query = scope.get("query_string", b"")[:ACCESS_MAX_TARGET].decode("latin-1") if self._query else ""
        self._lines.append(self._line(stamp, scope, path, query, record, seconds))
        if len(self._lines) >= ACCESS_BUFFER_LINES:
            self.flush()

    @staticmethod
    def _text_line(stamp: str, scope: Scope, path: str, query: str, record: RequestRecord, seconds: float) -> str:
        client = scope.get("client")
        upstream = record.upstream_seconds
        return (
            f"{stamp} INFO access: {client[0] if client else '-'} "
            f'"{scope["method"]} {path}{"?" + query if query else ""}" {record.status} source={record.source} '
            f"error={record.error or '-'} in={record.bytes_in} out={record.bytes_out} "
            f"duration_ms={seconds * 1000:.2f} upstream_ms={'-' if upstream is None else f'{upstream * 1000:.2f}'} "
            f"route={record.route} request_id={record.request_id} "
            f"upstream_request_id={record.upstream_request_id or '-'}"
            f"{' trace_id=' + record.trace_id if record.trace_id else ''}\n"
        )

    @staticmethod
    def _json_line(stamp: str, scope: Scope, path: str, query: str, record: RequestRecord, seconds: float) -> str:
        # The path and query come from the client: escaped (json_string, in C). The method (an HTTP token), the
        # client (an IP address), the route (a prefix from the settings, RFC 3986 path characters), both request
        # ids (SANE_REQUEST_ID), numbers and the sidecar's own codes need no escaping.
        client = scope.get("client")
        upstream = record.upstream_seconds
        error = f'"{record.error}"' if record.error else "null"
        peer = f'"{client[0]}"' if client else "null"
        upstream_id = f'"{record.upstream_request_id}"' if record.upstream_request_id else "null"
        trace = f',"trace_id":"{record.trace_id}"' if record.trace_id else ""
        return (
            f'{{"time":"{stamp}","level":"INFO","logger":"access",'
            f'"request_id":"{record.request_id}","client":{peer},"route":"{record.route}","method":"{scope["method"]}",'
            f'"path":{json_string(path)},"query":{json_string(query) if query else "null"},'
            f'"status":{record.status},"source":"{record.source}","error":{error},'
            f'"bytes_in":{record.bytes_in},"bytes_out":{record.bytes_out},"duration_ms":{seconds * 1000:.2f},'
            f'"upstream_ms":{"null" if upstream is None else f"{upstream * 1000:.2f}"},'
            f'"upstream_request_id":{upstream_id}{trace}}}\n'
        )

    def flush(self) -> None:
        if self._lines:
            stream = self._stream or sys.stderr
            stream.write("".join(self._lines))
            stream.flush()
            self._lines.clear()

    async def run(self) -> None:
        """Flush periodically until cancelled (the app's lifespan runs this), then once more."""
        try:
            while True:
                await asyncio.sleep(ACCESS_FLUSH_INTERVAL)
                self.flush()
        finally:
            self.flush()


__all__ = [
    "QUIET_LOGGERS",
    "AccessLog",
    "JsonFormatter",
    "LogFormat",
    "TextFormatter",
    "configure_logging",
    "event",
    "quiet_uvicorn",
    "set_trace_ids",
]
