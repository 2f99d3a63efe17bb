"""What an operator sees: request ids, access and event logs in both formats, metrics, and readiness under a
hanging token endpoint. Real servers on loopback; the pure pieces (ids, histograms, line escaping) beside."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import platform
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import promql_parser
import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.logs import JsonFormatter, TextFormatter
from tests.conftest import (
    BREAKS_OFF,
    FakeClock,
    SilentUpstream,
    Stack,
    answering,
    assert_hidden,
    metric,
    raw_upstream,
    run_sidecar,
    run_stack,
    sidecar_process,
    stack_env,
)

UTC_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
NEW_ID = re.compile(r"[0-9a-f]{32}")
# The access line's fields, as docs/operations.md documents them.
ACCESS_FIELDS = {
    "time",
    "level",
    "logger",
    "request_id",
    "client",
    "route",
    "method",
    "path",
    "query",
    "status",
    "source",
    "error",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_ms",
    "upstream_request_id",
}


def access_lines(stderr: str) -> list[dict[str, Any]]:
    """The JSON access lines in captured stderr (every line there must be JSON)."""
    return [line for line in map(json.loads, stderr.splitlines()) if line["logger"] == "access"]


def echoed(response: httpx2.Response, name: str) -> list[str]:
    """The values of header ``name`` that API Gateway's stand-in received."""
    return [value for key, value in response.json()["headers"] if key == name]


@pytest.fixture
def event_log() -> Iterator[dict[str, io.StringIO]]:
    """The package's log lines, in both formats (the formatters a process installs), while the test runs."""
    streams = {"json": io.StringIO(), "text": io.StringIO()}
    handlers = [logging.StreamHandler(streams["json"]), logging.StreamHandler(streams["text"])]
    handlers[0].setFormatter(JsonFormatter())
    handlers[1].setFormatter(TextFormatter())
    logger = logging.getLogger("proxy")
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield streams
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)


# Request ids ------------------------------------------------------------------------------------------------


async def test_a_sane_request_id_goes_upstream_comes_back_and_is_in_the_access_line(
    stack: Stack, client: httpx2.AsyncClient, capsys: pytest.CaptureFixture[str]
):
    settings = stack.settings(access_log=True, log_format="json")
    async with run_sidecar(settings) as sidecar:
        response = await client.get(f"{sidecar.url}/orders/7?email=a@b.example", headers={"X-Request-Id": "req-1.a"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-1.a"
    assert echoed(response, "x-request-id") == ["req-1.a"]
    [line] = access_lines(capsys.readouterr().err)
    assert set(line) == ACCESS_FIELDS
    assert UTC_TIME.fullmatch(line["time"])
    assert line["level"] == "INFO"
    assert line["request_id"] == "req-1.a"
    assert line["client"] == "127.0.0.1"
    assert (line["route"], line["method"], line["path"], line["status"]) == ("/", "GET", "/orders/7", 200)
    assert line["query"] is None  # queries can carry personal data: not logged unless asked for
    assert (line["source"], line["error"]) == ("upstream", None)
    assert (line["bytes_in"], line["bytes_out"]) == (0, len(response.content))
    assert line["duration_ms"] >= line["upstream_ms"] > 0
    assert line["upstream_request_id"] == response.headers["x-amzn-requestid"]


@pytest.mark.parametrize(
    "given",
    [None, "two words", "x" * 129, 'quote"d', "semi;colon", ""],
    ids=["none", "space", "too-long", "quote", "semicolon", "empty"],
)
async def test_a_missing_or_unsafe_request_id_is_replaced_by_a_new_one(
    stack: Stack, client: httpx2.AsyncClient, given: str | None
):
    headers = {"X-Request-Id": given} if given is not None else {}
    async with run_sidecar(stack.settings()) as sidecar:
        first = await client.get(f"{sidecar.url}/a", headers=headers)
        second = await client.get(f"{sidecar.url}/a", headers=headers)
    assert NEW_ID.fullmatch(first.headers["x-request-id"])
    assert echoed(first, "x-request-id") == [first.headers["x-request-id"]]  # the new one only, not the unsafe one
    assert first.headers["x-request-id"] != second.headers["x-request-id"]


async def test_the_upstreams_own_request_id_is_replaced_by_the_sidecars(stack: Stack, client: httpx2.AsyncClient):
    own_id = answering(b"HTTP/1.1 200 OK\r\nX-Request-Id: upstream-own\r\nContent-Length: 2\r\n\r\nok")
    async with raw_upstream(own_id) as url, run_sidecar(stack.settings(upstream_url=url)) as sidecar:
        response = await client.get(f"{sidecar.url}/x", headers={"X-Request-Id": "mine"})
    assert response.headers.get_list("x-request-id") == ["mine"]


async def test_the_sidecars_own_answers_carry_the_request_id_in_header_body_and_access_line(
    stack: Stack, client: httpx2.AsyncClient, capsys: pytest.CaptureFixture[str]
):
    settings = stack.settings(access_log=True, log_format="json")
    async with run_sidecar(settings) as sidecar:
        refused = await client.get(f"{sidecar.url}/x", headers={"Host": "evil.example", "X-Request-Id": "r-421"})
        not_ours = await client.get(f"{sidecar.url}/-/nothing", headers={"X-Request-Id": "r-404"})
    for response, request_id in ((refused, "r-421"), (not_ours, "r-404")):
        assert response.headers["x-request-id"] == request_id
        assert response.json()["request_id"] == request_id
    lines = {line["request_id"]: line for line in access_lines(capsys.readouterr().err)}
    assert lines["r-421"]["status"] == 421
    assert (lines["r-421"]["source"], lines["r-421"]["error"]) == ("sidecar", "host_not_allowed")
    assert lines["r-421"]["route"] == "none"  # refused before a route was chosen
    assert lines["r-421"]["bytes_out"] == len(refused.content)
    assert lines["r-404"]["route"] == "/-/"
    assert lines["r-421"]["upstream_ms"] is None  # nothing went upstream


async def test_passing_probes_and_scrapes_get_no_access_line_unless_asked_but_errors_always_do(
    stack: Stack, client: httpx2.AsyncClient, capsys: pytest.CaptureFixture[str]
):
    own = ("/-/healthz", "/-/readyz", "/-/metrics", "/-/nothing")
    async with run_sidecar(stack.settings(access_log=True, log_format="json")) as sidecar:
        assert [(await client.get(f"{sidecar.url}{path}")).status_code for path in own] == [200, 200, 200, 404]
        assert (await client.get(f"{sidecar.url}/orders")).status_code == 200
    assert [(line["path"], line["status"]) for line in access_lines(capsys.readouterr().err)] == [
        ("/-/nothing", 404),
        ("/orders", 200),
    ]
    # Nothing left out, and no successful answer sampled in: the probes are back, the forwarded 200 is gone.
    settings = stack.settings(access_log=True, log_format="json", access_log_exclude=(), access_log_sample=0.0)
    async with run_sidecar(settings) as sidecar:
        await client.get(f"{sidecar.url}/orders")
        refused = await client.get(f"{sidecar.url}/orders", headers={"Host": "evil.example"})
    assert [(line["path"], line["status"]) for line in access_lines(capsys.readouterr().err)] == [("/orders", 421)]
    assert refused.status_code == 421
    settings = stack.settings(access_log=True, log_format="json", access_log_exclude=())
    async with run_sidecar(settings) as sidecar:
        await client.get(f"{sidecar.url}/-/healthz")
    assert [line["path"] for line in access_lines(capsys.readouterr().err)] == ["/-/healthz"]


@pytest.mark.slow
@pytest.mark.parametrize("levels", ["", "httpx2=info"])
async def test_httpx2s_line_per_token_request_is_off_unless_its_logger_level_asks_for_it(stack: Stack, levels: str):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_LOG_LEVELS=levels)
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        assert (await client.get(f"{sidecar.url}/first")).status_code == 200
        code, text = await sidecar.stop()
    assert code == 0
    assert " INFO proxy.cache: token refreshed in " in text  # the sidecar's own line, either way
    httpx_lines = [line for line in text.splitlines() if " INFO httpx2: HTTP Request: POST" in line]
    assert [line.split(" POST ")[1].split()[0] for line in httpx_lines] == ([stack.token_url] if levels else [])


async def test_every_log_line_written_for_a_request_carries_its_id(
    stack: Stack, client: httpx2.AsyncClient, event_log: dict[str, io.StringIO]
):
    async with raw_upstream(answering(BREAKS_OFF)) as url, run_sidecar(stack.settings(upstream_url=url)) as sidecar:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.get(f"{sidecar.url}/x", headers={"X-Request-Id": "broken-1"})
    [warning] = [
        line for line in map(json.loads, event_log["json"].getvalue().splitlines()) if line["level"] == "WARNING"
    ]
    assert warning["request_id"] == "broken-1"
    assert "broke off the response body" in warning["message"]
    assert "broke off the response body" in event_log["text"].getvalue()
    assert "request_id=broken-1" in event_log["text"].getvalue()
    # The token refresh ran in its own task: it belongs to no request.
    refreshed = [line for line in map(json.loads, event_log["json"].getvalue().splitlines()) if "event" in line]
    assert [line["event"] for line in refreshed] == ["token_refreshed"]
    assert "request_id" not in refreshed[0]


# Logs from a real process, in both formats ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_a_process_logs_every_line_in_the_chosen_format_and_never_a_secret(stack: Stack, log_format: str):
    stack.emulator.cognito.fail_next(400, '{"error":"invalid_grant"}', times=1)
    env = stack_env(
        stack,
        SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token,
        SIDECAR_LOG_FORMAT=log_format,
        SIDECAR_LOG_LEVEL="debug",
        SIDECAR_CALLER_TOKEN="caller-secret-value",
    )
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        caller = {"X-Sidecar-Caller": "caller-secret-value"}
        # Cognito refuses the first token request: the refusal is held for a minute, and says why.
        first = await client.get(f"{sidecar.url}/first", headers=caller)
        unauthenticated = await client.get(f"{sidecar.url}/unauthenticated")
        code, text = await sidecar.stop()
    assert code == 0
    assert first.status_code == 503 and first.json()["error"] == "token_rejected"
    assert unauthenticated.status_code == 401
    assert_hidden(text, stack.emulator.refresh_token, stack.emulator.client.secret or "", "caller-secret-value")
    assert "Traceback" not in text
    lines = text.splitlines()
    if log_format == "text":
        assert all(UTC_TIME.match(line) for line in lines), lines
        assert f"request_id={first.headers['x-request-id']}" in text
        return
    parsed = [json.loads(line) for line in lines]  # every line, uvicorn's included
    assert all(UTC_TIME.fullmatch(line["time"]) and line["level"] and line["logger"] for line in parsed)
    assert {"uvicorn.error", "proxy", "access", "proxy.cache"} <= {line["logger"] for line in parsed}
    [failed] = [line for line in parsed if line.get("event") == "token_refresh_failed"]
    assert (failed["cognito_error"], failed["http_status"], failed["outcome"]) == ("invalid_grant", 400, "permanent")
    assert failed["attempt"] == 1 and failed["retry_in_s"] >= 60  # a refusal is held for a minute
    accessed = {line["request_id"]: line for line in parsed if line["logger"] == "access"}
    assert accessed[first.headers["x-request-id"]]["error"] == "token_rejected"
    assert accessed[unauthenticated.headers["x-request-id"]]["error"] == "caller_unauthenticated"


def lint_exposition(text: str) -> list[str]:
    """What ``promtool check metrics`` would say, for the parts that matter here: names, units, help, counters
    ending in _total, histograms whole, no label with unbounded values."""
    problems = []
    seen = set()
    for family in text_string_to_metric_families(text):
        if family.name in seen:
            problems.append(f"{family.name}: declared twice")
        seen.add(family.name)
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", family.name):
            problems.append(f"{family.name}: not snake_case")
        if not family.documentation:
            problems.append(f"{family.name}: no HELP")
        if family.type == "counter" and not all(s.name.endswith(("_total", "_created")) for s in family.samples):
            problems.append(f"{family.name}: counter samples must end in _total")
        if family.type == "histogram":
            buckets = [s for s in family.samples if s.name.endswith("_bucket")]
            if not buckets or not family.name.endswith("_seconds") or buckets[-1].labels.get("le") != "+Inf":
                problems.append(f"{family.name}: histogram without +Inf bucket or unit")
        if re.search(r"_(milliseconds|ms|minutes|hours|kilobytes)(_|$)", family.name):
            problems.append(f"{family.name}: not in base units")
        for sample in family.samples:
            for key, value in sample.labels.items():
                if key != "route" and "/" in value:
                    problems.append(f"{family.name}: label {key} holds a path")
                if NEW_ID.search(value):
                    problems.append(f"{family.name}: label {key} holds an id")
    return problems


async def test_metrics_are_valid_and_move_with_the_requests(stack: Stack, client: httpx2.AsyncClient):
    async with run_sidecar(stack.settings()) as sidecar:
        for index in range(7):
            assert (await client.get(f"{sidecar.url}/orders/{index}")).status_code == 200
        for _ in range(3):
            assert (await client.post(f"{sidecar.url}/orders", content=b"{}")).status_code == 200
        assert (await client.request("PURGE", f"{sidecar.url}/cache")).status_code == 200
        for _ in range(2):
            refused = await client.get(f"{sidecar.url}/x", headers={"Host": "evil.example"})
            assert refused.status_code == 421
        text = (await client.get(f"{sidecar.url}/-/metrics")).text
        openmetrics = await client.get(
            f"{sidecar.url}/-/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert lint_exposition(text) == []
    # The strict OpenMetrics parser, as Prometheus asks for it: raises on anything malformed.
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert list(openmetrics_families(openmetrics.text))

    def requests(route: str, method: str, status_class: str) -> float:
        return metric(text, "sidecar_requests_total", route=route, method=method, status_class=status_class)

    assert requests("/", "GET", "2xx") == 7
    assert requests("/", "POST", "2xx") == 3
    assert requests("/", "other", "2xx") == 1  # methods outside the common seven share one label value
    assert requests("none", "GET", "4xx") == 2
    assert metric(text, "sidecar_request_duration_seconds_count", route="/") == 11
    assert metric(text, "sidecar_request_duration_seconds_bucket", route="/", le="+Inf") == 11
    assert metric(text, "sidecar_upstream_duration_seconds_count", route="/") == 11
    assert 'sidecar_upstream_duration_seconds_count{route="none"}' not in text  # refused: nothing went upstream
    assert metric(text, "sidecar_errors_total", code="host_not_allowed") == 2
    assert metric(text, "sidecar_token_refreshes_total", outcome="success") == 1
    assert metric(text, "sidecar_token_refresh_duration_seconds_count") == 1
    assert metric(text, "sidecar_token_consecutive_failures") == 0
    assert metric(text, "sidecar_build_info", version=__version__, python=platform.python_version()) == 1
    assert metric(text, "process_resident_memory_bytes") > 0  # the default registry's process collector


# Readiness --------------------------------------------------------------------------------------------------


async def _probe(client: httpx2.AsyncClient, url: str, count: int) -> tuple[list[float], set[tuple[int, str]]]:
    took, answers = [], set()
    for _ in range(count):
        started = time.perf_counter()
        response = await client.get(url)
        took.append(time.perf_counter() - started)
        answers.add((response.status_code, response.json().get("error") or response.json()["status"]))
    return sorted(took), answers


async def test_readiness_answers_at_once_while_the_first_token_request_hangs(stack: Stack, client: httpx2.AsyncClient):
    token_endpoint = SilentUpstream()
    async with raw_upstream(token_endpoint) as url, run_sidecar(stack.settings(token_url=url)) as sidecar:
        await token_endpoint.first_connection()
        took, answers = await _probe(client, f"{sidecar.url}/-/readyz", 1000)
        ready = await client.get(f"{sidecar.url}/-/readyz")
        token_endpoint.release.set()
    assert answers == {(503, "token_pending")}
    assert "first token request is in progress" in ready.json()["detail"]
    # A bound that holds on any machine, not a benchmark: waiting on the hang would take seconds per probe.
    assert took[989] < 0.1, f"p99 {took[989] * 1000:.1f} ms"


@pytest.mark.slow
async def test_readiness_stays_green_at_once_while_a_background_refresh_hangs(client: httpx2.AsyncClient):
    clock = FakeClock()
    async with run_stack() as stack:
        stack.use_clock(clock)
        async with run_sidecar(stack.settings(), clock=clock) as sidecar:
            assert (await client.get(f"{sidecar.url}/-/readyz")).status_code in (200, 503)
            assert (await client.get(f"{sidecar.url}/warm")).status_code == 200
            stack.emulator.cognito.latency = 3600.0  # every token answer from now on hangs
            stack.emulator.cognito.seen.clear()
            clock.advance(3600 - 200)  # past the background refresh point, the token still valid
            async with asyncio.timeout(30):
                await stack.emulator.cognito.seen.wait()  # the refresh is in flight, hanging
            took, answers = await _probe(client, f"{sidecar.url}/-/readyz", 1000)
            assert (await client.get(f"{sidecar.url}/still-served")).status_code == 200
    assert answers == {(200, "ready")}
    assert took[989] < 0.1, f"p99 {took[989] * 1000:.1f} ms"


# Alert rules ------------------------------------------------------------------------------------------------

ALERT_RULES = Path(__file__).parent.parent / "deploy" / "prometheus" / "alerts.yaml"
OPERATIONS_PAGE = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()


def _selected_metrics(node: object) -> Iterator[str]:
    """Every metric name an expression selects, wherever it sits in the parsed tree."""
    if isinstance(node, promql_parser.VectorSelector):
        yield node.name
        return
    for attribute in ("lhs", "rhs", "expr", "vector_selector", "param"):
        child = getattr(node, attribute, None)
        if child is not None:
            yield from _selected_metrics(child)
    for argument in getattr(node, "args", None) or ():
        yield from _selected_metrics(argument)


async def test_the_alert_rules_parse_and_select_only_metrics_the_sidecar_exports(
    stack: Stack, client: httpx2.AsyncClient, tmp_path: Path
):
    # With a token store, so that its metrics are exported too.
    async with run_sidecar(stack.settings(token_store=f"file:{tmp_path}/store")) as sidecar:
        # A request and a refusal first, so that every labelled family has a sample.
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200
        assert (await client.get(f"{sidecar.url}/x", headers={"Host": "evil.example"})).status_code == 421
        text = (await client.get(f"{sidecar.url}/-/metrics")).text
    families = list(text_string_to_metric_families(text))
    # Every sample's name, and every family's (a family such as the client certificate's expiry has samples only
    # when a certificate is configured).
    declared = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    exported = {sample.name for family in families for sample in family.samples} | declared
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["alert"] for rule in rules} >= {
        "CognitoSidecarCredentialRefused",
        "CognitoSidecarTokenRefreshFailing",
        "CognitoSidecarTokenExpiringSoon",
        "CognitoSidecarAnswering5xx",
        "CognitoSidecarTokenStoreTrouble",
        "CognitoSidecarUpstream5xx",
        "CognitoSidecarSlow",
        "CognitoSidecarAbsent",
    }
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s"))
        selected = set(_selected_metrics(promql_parser.parse(rule["expr"])))  # raises on a syntax error
        assert selected and selected <= exported, (rule["alert"], selected - exported)
        # Each links its runbook: a section of the operations page named after the alert.
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page.endswith("/docs/operations.md") and anchor == rule["alert"].lower()
        assert f"\n### {rule['alert']}\n" in OPERATIONS_PAGE, rule["alert"]


# The metrics listener ---------------------------------------------------------------------------------------


async def test_the_metrics_listener_serves_the_sidecars_own_routes_and_never_forwards(
    stack: Stack, client: httpx2.AsyncClient
):
    async with run_sidecar(stack.settings(metrics_listen="127.0.0.1:0")) as sidecar:
        assert sidecar.metrics_url is not None and sidecar.metrics_url != sidecar.url
        assert (await client.get(f"{sidecar.url}/through-the-main-listener")).status_code == 200
        metrics = await client.get(f"{sidecar.metrics_url}/-/metrics")
        ready = await client.get(f"{sidecar.metrics_url}/-/readyz")
        before = stack.emulator.apigw.requests
        # Any Host, any path: nothing here can use the credential.
        refused = await client.get(f"{sidecar.metrics_url}/orders/7", headers={"Host": "prometheus.monitoring.svc"})
        assert stack.emulator.apigw.requests == before
    assert metric(metrics.text, "sidecar_requests_total", route="/", method="GET", status_class="2xx") == 1
    assert ready.status_code == 200
    assert refused.status_code == 404
    assert refused.json()["error"] == "not_found" and "SIDECAR_METRICS_LISTEN" in refused.json()["detail"]
    assert refused.headers["x-request-id"] == refused.json()["request_id"]


@pytest.mark.slow
async def test_serve_opens_the_metrics_listener_beside_the_main_one(stack: Stack):
    env = stack_env(stack, SIDECAR_REFRESH_TOKEN=stack.emulator.refresh_token, SIDECAR_METRICS_LISTEN="127.0.0.1:0")
    async with sidecar_process(env) as sidecar, httpx2.AsyncClient(trust_env=False, timeout=30) as client:
        line = await sidecar.read_until("the /-/ routes only) on ")
        metrics_url = line.split(" on ")[-1].strip()
        assert (await client.get(f"{sidecar.url}/x")).status_code == 200
        metrics = (await client.get(f"{metrics_url}/-/metrics")).text
        refused = await client.get(f"{metrics_url}/x")
        code, _ = await sidecar.stop()
    assert code == 0
    assert metric(metrics, "sidecar_requests_total", route="/", method="GET", status_class="2xx") == 1
    assert refused.status_code == 404


async def test_the_metrics_listener_answers_only_peers_in_its_allow_from(stack: Stack, client: httpx2.AsyncClient):
    settings = stack.settings(metrics_listen="127.0.0.1:0", metrics_allow_from="10.0.0.0/8")
    async with run_sidecar(settings) as sidecar:
        assert sidecar.metrics_url is not None
        refused = await client.get(f"{sidecar.metrics_url}/-/metrics")
        assert (refused.status_code, refused.json()["error"]) == (403, "client_not_allowed")
        assert "SIDECAR_METRICS_ALLOW_FROM" in refused.json()["detail"]
        assert refused.headers["connection"] == "close"
        assert (await client.get(f"{sidecar.url}/-/healthz")).status_code == 200  # the main listener is not affected
