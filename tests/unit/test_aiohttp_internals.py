"""What ``proxy.egress.client.ForwardedRequest`` relies on in aiohttp's ``ClientRequest``, so that an upgrade that
changes it fails here rather than in the headers a client's request arrives with.

ForwardedRequest overrides ``update_headers`` and ``update_auto_headers`` to do once what aiohttp does per request.
Built from the same inputs, it must hold exactly the headers, and the table of headers not to add, that aiohttp's
own request holds. And ``serve`` imports aiohttp so that its import-time TLS contexts skip the CA bundle (last test).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from proxy.egress.client import SKIPPED_AUTO_HEADERS, ForwardedRequest
from proxy.emulator.pki import TestCA

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


# serve imports aiohttp inside proxy.egress.tls.bundle_deferred, so that the two default contexts aiohttp's connector
# module builds as it is imported skip OpenSSL's default CA file (a tenth of the sidecar's start). The probe names that
# file (a one-certificate bundle, so the figures hold on any machine) and reads what each context loaded.
BUNDLE_PROBE = """
import json, ssl
from proxy.egress.tls import bundle_deferred, default_context
with bundle_deferred():
    import aiohttp.connector
print(json.dumps([
    aiohttp.connector._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509_ca"],
    default_context().cert_store_stats()["x509_ca"],
]))
"""


def test_aiohttp_s_import_time_contexts_skip_the_bundle_and_the_sidecar_s_own_loads_it(tmp_path: Path):
    bundle = TestCA(tmp_path, "Machine Trust Store CA").ca_file
    env = {**os.environ, "SSL_CERT_FILE": str(bundle)}
    probe = subprocess.run([sys.executable, "-c", BUNDLE_PROBE], env=env, capture_output=True, check=True, timeout=60)
    aiohttp_s, sidecar_s = json.loads(probe.stdout)
    assert (aiohttp_s, sidecar_s) == (0, 1)
