"""What ``proxy.forward.ForwardedRequest`` relies on in aiohttp's ``ClientRequest``, so that an upgrade that changes
it fails here rather than in the headers a client's request arrives with.

ForwardedRequest overrides ``update_headers`` and ``update_auto_headers`` to do once what aiohttp does per request.
Built from the same inputs, it must hold exactly the headers, and the table of headers not to add, that aiohttp's
own request holds.
"""

from __future__ import annotations

import inspect

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.forward import SKIPPED_AUTO_HEADERS, ForwardedRequest

CASES = {
    "plain": ("GET", "http://api.example:8443/prod/x", [("Authorization", "t"), ("X-Request-Id", "r")], None),
    "repeated names": ("GET", "http://api.example/x", [("X-A", "1"), ("x-a", "2"), ("Cookie", "a=1")], None),
    "a body": ("POST", "https://api.example/x", [("Content-Length", "5")], b"hello"),
    "no headers": ("GET", "http://[::1]:9/x", [], None),
    "a Host given": ("GET", "http://api.example/x", [("Host", "other.example"), ("X-B", "2")], None),
}


def test_client_request_still_calls_the_two_steps_from_its_constructor():
    source = inspect.getsource(aiohttp.ClientRequest.__init__)
    assert "self.update_headers(headers)" in source
    assert "self.update_auto_headers(skip_auto_headers)" in source
    # The table update_auto_headers leaves behind, which later steps (a body's Content-Type) consult.
    assert "self._skip_auto_headers" in inspect.getsource(aiohttp.ClientRequest)


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_forwarded_request_holds_what_aiohttp_s_own_request_holds(
    case: tuple[str, str, list[tuple[str, str]], bytes | None],
):
    method, url, headers, body = case
    built = [
        kind(method, URL(url), headers=CIMultiDict(headers), skip_auto_headers=SKIPPED_AUTO_HEADERS, data=body)
        for kind in (aiohttp.ClientRequest, ForwardedRequest)
    ]
    theirs, ours = built
    assert list(ours.headers.items()) == list(theirs.headers.items())
    assert sorted(ours.skip_auto_headers) == sorted(theirs.skip_auto_headers)
