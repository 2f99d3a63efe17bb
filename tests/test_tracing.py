"""OpenTelemetry traces from a real ``serve`` process to a real OTLP/HTTP receiver on loopback, decoded with the
protocol's own protobuf definitions: the caller's trace continued, the upstream call's span named in the
``traceparent`` API Gateway receives, the token refresh a trace of its own linked from the request that waited on
it, trace ids on JSON log lines and as exemplars on the latency histograms."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.server.serving import running
from tests.conftest import Stack, assert_hidden, sidecar_process, stack_env

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status: int


@dataclass
class Receiver:
    """An OTLP/HTTP traces endpoint: every span it was sent, decoded."""

    spans: list[Span] = field(default_factory=list)
    services: set[str] = field(default_factory=set)

    async def export(self, request: Request) -> Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(await request.body())
        for resource in message.resource_spans:
            for attribute in resource.resource.attributes:
                if attribute.key == "service.name":
                    self.services.add(attribute.value.string_value)
            for scope in resource.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        Span(
                            span.name,
                            span.kind,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            {a.key: _value(a.value) for a in span.attributes},
                            [(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                            span.status.code,
                        )
                    )
        return Response(b"", media_type="application/x-protobuf")

    def named(self, name: str) -> list[Span]:
        return [span for span in self.spans if span.name == name]


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value"))


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    found = Receiver()
    async with running(Starlette(routes=[Route("/v1/traces", found.export, methods=["POST"])])) as url:
        yield found, url


SERVER, CLIENT = 2, 3  # Span.SpanKind in the protocol


@pytest.mark.slow
async def test_a_request_is_traced_from_the_callers_span_to_the_upstream_and_the_refresh_it_waited_on(
    stack: Stack, receiver: tuple[Receiver, str]
):
    found, url = receiver
    stack.emulator.cognito.latency = 1.0  # the first request waits on the first refresh
    env = stack_env(
        stack,
        SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token,
        SIDECAR_LOG_FORMAT="json",
        OTEL_EXPORTER_OTLP_ENDPOINT=url,
        OTEL_BSP_SCHEDULE_DELAY="50",
    )
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "vendor=1"}
        first = await client.get(f"{sidecar.url}/orders/7?secret-query=1", headers=caller)
        fresh = await client.get(f"{sidecar.url}/orders/8")
        exposition = (
            await client.get(f"{sidecar.url}/-/metrics", headers={"Accept": "application/openmetrics-text"})
        ).text
        code, said = await sidecar.stop()  # the last spans go out at stop
    assert code == 0 and first.status_code == 200 and fresh.status_code == 200
    assert found.services == {"cognito-sidecar"}
    assert [s.name for s in found.spans if str(s.attributes.get("url.path", "")).startswith("/-/")] == []  # no probes
    [server] = [span for span in found.named("GET /") if span.trace_id == CALLER_TRACE]
    assert (server.kind, server.parent) == (SERVER, CALLER_SPAN)  # the caller's trace, continued
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/" and server.attributes["url.path"] == "/orders/7"
    [upstream] = [span for span in found.named("GET") if span.parent == server.span_id]
    assert (upstream.kind, upstream.trace_id) == (CLIENT, CALLER_TRACE)
    assert upstream.attributes["url.full"].endswith("/prod/orders/7")  # no query string
    # API Gateway got the upstream span's context in place of the caller's.
    sent = dict(first.json()["headers"])
    assert sent["traceparent"] == f"00-{CALLER_TRACE}-{upstream.span_id}-01"
    # The refresh: a trace of its own, linked from the request that waited on it.
    [refresh] = found.named("cognito token refresh")
    assert refresh.trace_id != CALLER_TRACE and refresh.parent == ""
    assert refresh.attributes["sidecar.outcome"] == "success"
    assert (refresh.trace_id, refresh.span_id) in server.links
    # The second request started a trace of its own, and waited on nothing.
    [second] = [span for span in found.named("GET /") if span.trace_id != CALLER_TRACE]
    assert second.parent == "" and second.links == []
    # Log lines written during a request carry its ids; the access line, its trace.
    lines = [json.loads(line) for line in said.splitlines() if line.startswith("{")]
    access = {line["request_id"]: line for line in lines if line["logger"] == "access"}
    assert access[first.headers["x-request-id"]]["trace_id"] == CALLER_TRACE
    # Exemplars: a latency bucket names a trace that was exported.
    exemplars = [
        sample.exemplar.labels["trace_id"]
        for family in openmetrics_families(exposition)
        if family.name == "sidecar_request_duration_seconds"
        for sample in family.samples
        if sample.exemplar is not None
    ]
    assert exemplars and set(exemplars) <= {span.trace_id for span in found.spans}
    exported = json.dumps([span.attributes for span in found.spans])
    assert_hidden(exported + said, stack.emulator.refresh_token, stack.emulator.client.secret or "", "secret-query")


async def test_sidecar_tracing_0_keeps_tracing_off_whatever_the_otel_variables_say(
    stack: Stack, receiver: tuple[Receiver, str]
):
    found, url = receiver
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_TRACING="0")
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        answer = await client.get(f"{sidecar.url}/orders/7", headers=caller)
        code, said = await sidecar.stop()
    assert code == 0 and "tracing on" not in said and found.spans == []
    assert dict(answer.json()["headers"])["traceparent"] == caller["traceparent"]  # passed through untouched


async def test_a_request_the_sampler_leaves_out_passes_the_callers_traceparent_as_it_came(
    stack: Stack, receiver: tuple[Receiver, str]
):
    found, url = receiver
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_LOG_FORMAT="json")
    env |= {"OTEL_EXPORTER_OTLP_ENDPOINT": url, "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_TRACES_SAMPLER": "always_off"}
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
        answer = await client.get(f"{sidecar.url}/orders/7", headers=caller)
        code, said = await sidecar.stop()
    assert code == 0 and "tracing on" in said
    assert [span.name for span in found.spans if span.name != "cognito token refresh"] == []  # nothing recorded
    assert dict(answer.json()["headers"])["traceparent"] == caller["traceparent"]
    access = [json.loads(line) for line in said.splitlines() if line.startswith('{"time"') and '"access"' in line]
    assert access and all("trace_id" not in line for line in access)
