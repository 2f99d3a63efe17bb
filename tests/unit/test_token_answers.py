"""What the token endpoint's answers mean, over plain response values: no server."""

from __future__ import annotations

import httpx2
import pytest

from proxy.errors import PermanentTokenError, TransientTokenError
from proxy.tokens.endpoint import classify, parse_success

URL = "https://my-app.auth.us-east-1.amazoncognito.com/oauth2/token"


def test_tokens_come_out_and_a_rotated_refresh_token_is_handed_over_first():
    seen: list[str] = []
    body = {"id_token": "a.b.c", "access_token": "d.e.f", "refresh_token": "r2", "expires_in": 3600}
    answer = parse_success("refresh", httpx2.Response(200, json=body), seen.append)
    assert seen == ["r2"]
    assert (answer.id_token, answer.access_token, answer.refresh_token, answer.expires_in) == (
        "a.b.c",
        "d.e.f",
        "r2",
        3600,
    )


def test_a_200_without_tokens_is_worth_retrying_and_never_quoted():
    seen: list[str] = []
    body = {"refresh_token": "r2", "secret_looking": "x" * 40}
    with pytest.raises(TransientTokenError, match="200 without tokens") as failure:
        parse_success("refresh", httpx2.Response(200, json=body), seen.append)
    assert seen == ["r2"]  # kept even so: Cognito may have retired the old one
    assert "x" * 40 not in str(failure.value)


@pytest.mark.parametrize("error", ["invalid_grant", "invalid_client", "unauthorized_client"])
def test_refusals_a_person_must_fix_are_permanent_and_explained(error: str):
    refused = classify("refresh", URL, httpx2.Response(400, json={"error": error}), ())
    assert isinstance(refused, PermanentTokenError)
    assert refused.error == error and refused.status == 400
    assert refused.causes and refused.fix


def test_throttling_server_errors_and_wrong_urls():
    throttled = classify("refresh", URL, httpx2.Response(429, headers={"retry-after": "7"}), ())
    assert isinstance(throttled, TransientTokenError) and throttled.throttled and throttled.retry_after == 7
    html = classify("refresh", URL, httpx2.Response(400, text="<html>TooManyRequestsException</html>"), ())
    assert isinstance(html, TransientTokenError) and html.throttled
    failed = classify("refresh", URL, httpx2.Response(502, text="bad gateway"), ())
    assert isinstance(failed, TransientTokenError) and not failed.throttled and failed.status == 502
    wrong = classify("refresh", URL, httpx2.Response(404, text="not here"), ())
    assert isinstance(wrong, PermanentTokenError) and URL in str(wrong)


def test_secrets_echoed_in_an_error_body_are_masked():
    echoed = classify("refresh", URL, httpx2.Response(500, text="client_secret=s3cret-value"), ("s3cret-value",))
    assert "s3cret-value" not in str(echoed) and "s3cret-value" not in echoed.body


def test_a_short_secret_hides_itself_and_leaves_the_message_readable():
    said = classify(
        "refresh", URL, httpx2.Response(502, text="[Errno -2] Name or service not known; secret=r&x"), ("r",)
    )
    assert "[Errno -2] Name or service not known" in said.body
    assert "secret=[redacted]&x" in said.body


def test_a_long_secret_is_hidden_even_glued_to_other_letters():
    secret = "s3cretvalue0123456789"
    answer = httpx2.Response(500, text=f"x{secret}y and {secret}")
    said = classify("refresh", URL, answer, (secret,))
    assert secret not in said.body and secret not in str(said)
