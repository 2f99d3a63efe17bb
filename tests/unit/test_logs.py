"""Access lines, request ids, histograms and response headers, as pure functions."""

from __future__ import annotations

import io
import json
import re

import pytest

from proxy.headers import downstream_response_headers
from proxy.logs import AccessLog
from proxy.request import RequestRecord, new_request_id, request_id_of
from proxy.stats import Histogram

NEW_ID = re.compile(r"[0-9a-f]{32}")


def test_json_access_lines_escape_whatever_the_client_sent():
    stream = io.StringIO()
    access = AccessLog("json", query=True, stream=stream)
    scope = {
        "method": "GET",
        "path": "/",
        "raw_path": b'/a"b\\c\xe9\x01',
        "query_string": b'q="x"',
        "client": ("::1", 5),
    }
    record = RequestRecord("id-1")
    record.route, record.upstream_request_id = "/r", "a-1"
    access.record(scope, record, 0.0012)
    access.flush()
    line = json.loads(stream.getvalue())
    assert line["path"] == '/a"b\\c\xe9\x01'
    assert line["query"] == 'q="x"'
    assert line["route"] == "/r"
    assert line["upstream_request_id"] == "a-1"
    assert line["duration_ms"] == 1.2


def test_request_ids_are_kept_when_sane_and_new_otherwise():
    assert request_id_of([(b"x-request-id", b"f81d4fae-7dec-11d0-a765-00a0c91e6bf6")]) == (
        "f81d4fae-7dec-11d0-a765-00a0c91e6bf6"
    )
    assert NEW_ID.fullmatch(request_id_of([(b"x-request-id", b"a b")]))
    assert NEW_ID.fullmatch(request_id_of([]))
    assert len({new_request_id() for _ in range(1000)}) == 1000


# Metrics ----------------------------------------------------------------------------------------------------


def test_histograms_count_into_the_right_buckets():
    histogram = Histogram((0.001, 0.01, 1.0))
    for value in (0.0005, 0.001, 0.002, 0.5, 7.0):
        histogram.observe(value)
    assert histogram.cumulative() == [("0.001", 2.0), ("0.01", 3.0), ("1.0", 4.0), ("+Inf", 5.0)]
    assert histogram.count == 5
    assert histogram.sum == pytest.approx(7.5035)


def test_response_headers_lose_the_upstreams_request_id_and_yield_api_gateways():
    raw = [(b"Content-Type", b"application/json"), (b"X-Request-Id", b"theirs"), (b"apigw-requestid", b"Ab1=")]
    headers, gateway_id = downstream_response_headers(raw)
    assert headers == [(b"content-type", b"application/json"), (b"apigw-requestid", b"Ab1=")]
    assert gateway_id == b"Ab1="
    assert downstream_response_headers([(b"x-amzn-RequestId", b"c8f5")])[1] == b"c8f5"
    assert downstream_response_headers([])[1] == b""


def _answered(path: str, status: int, error: str = "") -> tuple[dict[str, object], RequestRecord]:
    record = RequestRecord("id")
    record.status, record.error = status, error
    return {"method": "GET", "path": path, "client": ("127.0.0.1", 5)}, record


def test_excluded_prefixes_and_sampling_drop_only_answers_below_400():
    stream = io.StringIO()
    access = AccessLog("json", exclude=("/-/",), sample=0.0, stream=stream)
    for path, status, error in [
        ("/-/healthz", 200, ""),  # excluded
        ("/orders", 200, ""),  # sampled out
        ("/orders", 304, ""),  # sampled out
        ("/-/readyz", 503, ""),  # an error: always
        ("/-/config", 403, "client_not_allowed"),
        ("/orders", 404, ""),
        ("/orders", 0, "client_gone"),
    ]:
        access.record(*_answered(path, status, error), 0.001)
    access.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["path"], line["status"]) for line in lines] == [
        ("/-/readyz", 503),
        ("/-/config", 403),
        ("/orders", 404),
        ("/orders", 0),
    ]


def test_sampling_keeps_about_the_share_asked_for(monkeypatch: pytest.MonkeyPatch):
    import random

    monkeypatch.setattr(random, "random", random.Random(7).random)  # the same draws every run
    stream = io.StringIO()
    access = AccessLog("text", sample=0.25, stream=stream)
    for _ in range(4000):
        access.record(*_answered("/orders", 200), 0.001)
    access.flush()
    assert 900 <= len(stream.getvalue().splitlines()) <= 1100
