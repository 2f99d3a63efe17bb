"""What the shared store holds, sealed: another key, tampering and plaintext are refused. No store."""

from __future__ import annotations

import pytest

from proxy.errors import ConfigError
from proxy.settings import load_settings
from proxy.tokens.sealed import Record, Sealer, UnreadableRecord
from proxy.tokens.token import TokenResponse


def test_sealing_refuses_another_key_tampering_and_plaintext() -> None:
    record = Record(
        received=1.0,
        response=TokenResponse(id_token="a.b.c", access_token=None, refresh_token=None, expires_in=60, token_type="x"),
        refresh_token="rt-secret",
        rotates=True,
    )
    sealer = Sealer("url\nclient\nrefresh_token\n", b"key one")
    blob = sealer.seal_record(record)
    assert b"rt-secret" not in blob and b"a.b.c" not in blob
    assert sealer.open_record(blob) == record
    with pytest.raises(UnreadableRecord):
        Sealer("url\nclient\nrefresh_token\n", b"key two").open_record(blob)
    tampered = blob[:-1] + bytes([blob[-1] ^ 1])
    with pytest.raises(UnreadableRecord):
        sealer.open_record(tampered)
    other = Sealer("url\nanother-client\nrefresh_token\n", b"key one")
    assert other.key != sealer.key
    with pytest.raises(UnreadableRecord):
        other.open_record(blob)  # a blob moved to another credential's key
    plain = Sealer("url\nclient\nrefresh_token\n", None)
    with pytest.raises(UnreadableRecord):
        sealer.open_record(plain.seal_record(record))  # planted in clear
    assert "rt-secret" not in repr(record) and "a.b.c" not in repr(record)


def test_a_public_client_on_redis_needs_a_store_key() -> None:
    env = {
        "SIDECAR_UPSTREAM_URL": "https://api.example.com/prod",
        "SIDECAR_COGNITO_DOMAIN": "https://auth.example.com",
        "SIDECAR_CLIENT_ID": "client",
        "SIDECAR_REFRESH_TOKEN": "rt",
        "SIDECAR_TOKEN_STORE": "redis://:hunter2@redis:6379/0",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert "SIDECAR_TOKEN_STORE_KEY" in str(caught.value)
    settings = load_settings({**env, "SIDECAR_TOKEN_STORE_KEY": "k" * 32})
    assert "hunter2" not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        load_settings({**env, "SIDECAR_TOKEN_STORE": "file:relative"})
    assert "absolute" in str(caught.value)


def test_a_public_client_seals_with_the_stores_own_key_under_the_same_names() -> None:
    record = Record(
        received=1.0,
        response=TokenResponse(id_token="a.b.c", access_token=None, refresh_token=None, expires_in=60, token_type="x"),
        refresh_token="rt-secret",
        rotates=False,
    )
    identity = "url\npublic-client\nrefresh_token\n"
    plain = Sealer(identity, None)
    local = Sealer(identity, None, local_key=b"k" * 32)
    assert local.sealed and not plain.sealed
    # Records written before the store had a key keep their name and fingerprints...
    assert local.key == plain.key and local.fingerprint("rt-secret") == plain.fingerprint("rt-secret")
    blob = local.seal_record(record)
    assert b"rt-secret" not in blob and local.open_record(blob) == record
    with pytest.raises(UnreadableRecord):
        Sealer(identity, None, local_key=b"o" * 32).open_record(blob)  # another directory's key
    # ...and are sealed once, when the key is made; a plaintext record is refused otherwise.
    old = plain.seal_record(record)
    with pytest.raises(UnreadableRecord):
        local.open_record(old)
    upgraded = local.upgrade(old)
    assert upgraded is not None and local.open_record(upgraded) == record
    assert local.upgrade(blob) is None and plain.upgrade(old) is None


def test_the_key_check_names_the_credential_alone_and_tells_keys_apart() -> None:
    identity = "url\nclient\nrefresh_token\n"
    one, again, other = Sealer(identity, b"key one"), Sealer(identity, b"key one"), Sealer(identity, b"key two")
    assert one.check_key == other.check_key == Sealer(identity, None).check_key
    assert one.check_key != Sealer("url\nanother\nrefresh_token\n", b"key one").check_key
    assert one.check_value == again.check_value != other.check_value
    assert one.key != other.key  # the records themselves are under names that need the key
