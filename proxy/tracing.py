"""OpenTelemetry traces, when asked for: ``SIDECAR_TRACING=1``, or an ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) in the environment. The SDK is the ``otel`` extra
(``pip install 'cognito-sidecar[otel]'``; the image carries it) and is imported only then: with tracing off, the
request path pays one ``is None`` test per request and per upstream call.

What is traced, with the semantic conventions' names:

- a **server** span per request (``GET /orders``: method and route), continuing the caller's ``traceparent``
  (and ``tracestate``) or starting a trace;
- a **client** span per upstream call (a replay is a second one), whose context is the ``traceparent`` sent
  upstream in place of the caller's, so API Gateway's and the integration's spans (X-Ray, or the API's own
  tracing) hang under it;
- a span per **token refresh**, a trace of its own (it serves many requests), linked from every request that
  waited on it.

Spans go to the OTLP/HTTP exporter in batches (``OTEL_BSP_*``); every other ``OTEL_*`` variable (service name,
resource attributes, headers, timeout, sampler) works as the SDK documents. No span carries a token, a header
value, a query string or a secret.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from proxy import __version__

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.trace import Span, SpanContext

    from proxy.request import RequestRecord
    from proxy.types import Scope

# The variables that turn tracing on when SIDECAR_TRACING is not set.
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_TRACE_HEADERS = frozenset({b"traceparent", b"tracestate"})


def wanted(env: Mapping[str, str]) -> bool:
    """Whether ``env`` asks for traces without saying SIDECAR_TRACING: an OTLP endpoint, and the SDK not disabled."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)


def endpoint_of(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL ``env`` names (the SDK's default, localhost:4318, when none)."""
    traces = env.get(ENDPOINT_VARIABLES[0], "").strip()
    if traces:
        return traces
    base = env.get(ENDPOINT_VARIABLES[1], "").strip()
    return f"{base.rstrip('/')}/v1/traces" if base else None


class Tracing:
    """The tracer and what the request path asks of it. Made only when tracing is on (it imports the SDK)."""

    def __init__(self, endpoint: str | None = None) -> None:
        from opentelemetry import context, trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create({SERVICE_VERSION: __version__})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: "cognito-sidecar"}))
        self.provider = TracerProvider(resource=resource)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        self.tracer = self.provider.get_tracer("cognito-sidecar", __version__)
        self._trace = trace
        self._context = context
        self._kind = trace.SpanKind
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._propagator = TraceContextTextMapPropagator()

    # A request --------------------------------------------------------------------------------------------------

    def start_request(self, scope: Scope) -> tuple[Span, Token[Context]] | None:
        """The server span of the request in ``scope``, made current; hand the pair to ``end_request``. None when
        the sampler leaves the request out: then nothing else is traced for it."""
        headers = scope["headers"]
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers if name in _TRACE_HEADERS}
        parent = self._propagator.extract(carrier) if carrier else None
        client = scope.get("client")
        attributes: dict[str, Any] = {"http.request.method": scope["method"], "url.path": scope["path"]}
        if client:
            attributes["client.address"] = client[0]
        span = self.tracer.start_span(scope["method"], context=parent, kind=self._kind.SERVER, attributes=attributes)
        if not span.is_recording():
            return None  # sampled out: no child span, no context to carry; the caller's traceparent passes as it came
        token = self._context.attach(self._trace.set_span_in_context(span))
        return span, token

    def end_request(self, started: tuple[Span, Token[Context]], method: str, record: RequestRecord) -> None:
        """End the server span with what ``record`` says happened; notes the trace id in it (for exemplars)."""
        span, token = started
        span.update_name(f"{method} {record.route}")
        span.set_attribute("http.route", record.route)
        span.set_attribute("http.response.status_code", record.status)
        span.set_attribute("sidecar.request_id", record.request_id)
        if record.upstream_request_id:
            span.set_attribute("aws.api_gateway.request_id", record.upstream_request_id)
        if record.error:
            span.set_attribute("error.type", record.error)
        if record.status >= 500 or (record.error and record.status == 0):
            span.set_status(self._error)
        span.end()
        self._context.detach(token)
        record.trace_id = f"{span.get_span_context().trace_id:032x}"

    # An upstream call -------------------------------------------------------------------------------------------

    def start_upstream(self, method: str, url: str, headers: list[tuple[str, str]]) -> Span | None:
        """The client span of one upstream call, child of the current request's; replaces any ``traceparent`` and
        ``tracestate`` in ``headers`` with its own. None, and the headers untouched, outside a recorded request."""
        if not self._trace.get_current_span().is_recording():
            return None
        span = self.tracer.start_span(
            method,
            kind=self._kind.CLIENT,
            attributes={"http.request.method": method, "url.full": url.split("?", 1)[0]},
        )
        headers[:] = [(name, value) for name, value in headers if name not in ("traceparent", "tracestate")]
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        headers.extend(carrier.items())
        return span

    def end_upstream(self, span: Span, status: int | None, failure: str = "") -> None:
        """End an upstream call's span: the answer's ``status``, or the sidecar's error code for a ``failure``."""
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(self._error)
        if failure:
            span.set_attribute("error.type", failure)
            span.set_status(self._error)
        span.end()

    # A token refresh --------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def refresh(self, kinds: frozenset[str]) -> Iterator[Span]:
        """A token refresh's span: a trace of its own. Give it its ``outcome`` before it ends."""
        with self.tracer.start_as_current_span(
            "cognito token refresh",
            context=self._context.Context(),  # a root: it serves many requests, the one that woke it included
            kind=self._kind.CLIENT,
            attributes={"sidecar.token_kinds": ",".join(sorted(kinds))},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            yield span

    def outcome(self, span: Span, outcome: str) -> None:
        """A refresh's outcome: ``success`` or the failure's kind."""
        span.set_attribute("sidecar.outcome", outcome)
        if outcome != "success":
            span.set_status(self._error)

    def link_current(self, context: SpanContext) -> None:
        """Link the current span (a request's) to ``context`` (the refresh it waited on)."""
        self._trace.get_current_span().add_link(context)

    def current_ids(self) -> tuple[str, str] | None:
        """The current span's trace and span ids, in hex, for a log line; None outside a span."""
        found = self._trace.get_current_span().get_span_context()
        return (f"{found.trace_id:032x}", f"{found.span_id:016x}") if found.is_valid else None

    def shutdown(self) -> None:
        """Export what is still waiting, then stop."""
        self.provider.shutdown()


__all__ = ["ENDPOINT_VARIABLES", "Tracing", "endpoint_of", "wanted"]
