"""Settings from the environment, *_FILE files and TOML: every problem at once, with its place. No server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import ConfigError
from proxy.settings import FILE_KEYS, load_settings
from proxy.settings.effective import effective, effective_text
from proxy.settings.reference import described
from tests.conftest import BASE, REFRESH, SECRET


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "sidecar.toml"
    path.write_text(text)
    return str(path)


def test_valid_settings_and_defaults():
    settings = load_settings(BASE)
    assert settings.token_url == "https://my-app.auth.us-east-1.amazoncognito.com/oauth2/token"
    assert settings.token == "id_token"
    assert settings.header == "Authorization"
    assert settings.header_prefix == ""
    assert settings.listen_address == ("127.0.0.1", 8080)
    assert SECRET not in repr(settings) and REFRESH not in repr(settings)


def test_every_problem_is_reported_at_once():
    env = {
        "SIDECAR_UPSTREAM_URL": "ftp://nowhere",
        "SIDECAR_TOKEN": "both",
        "SIDECAR_LISTEN": "8080",
        "SIDECAR_CLIENTID": "typo",
        "SIDECAR_CLIENT_SECRET": SECRET,
    }
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    text = str(info.value)
    for name in (
        "SIDECAR_UPSTREAM_URL",
        "SIDECAR_TOKEN_URL: is required: set SIDECAR_COGNITO_DOMAIN",
        "SIDECAR_CLIENT_ID",
        "SIDECAR_REFRESH_TOKEN",
        "SIDECAR_TOKEN",
        "SIDECAR_LISTEN",
        "SIDECAR_CLIENTID",
    ):
        assert name in text, name
    assert len(info.value.problems) == 7
    assert SECRET not in text


def test_plain_http_only_for_loopback_unless_allowed():
    env = {**BASE, "SIDECAR_UPSTREAM_URL": "http://api.internal/prod"}
    with pytest.raises(ConfigError, match="SIDECAR_UPSTREAM_URL: plain http"):
        load_settings(env)
    assert load_settings({**env, "SIDECAR_ALLOW_INSECURE": "1"}).upstream_url == "http://api.internal/prod"
    assert load_settings({**BASE, "SIDECAR_UPSTREAM_URL": "http://127.0.0.1:9/prod"})
    # Loopback is 127.0.0.0/8, ::1 and localhost: a *.localhost name may be resolved by DNS.
    assert load_settings({**BASE, "SIDECAR_UPSTREAM_URL": "http://localhost:9/prod"})
    assert load_settings({**BASE, "SIDECAR_UPSTREAM_URL": "http://[::1]:9/prod"})
    with pytest.raises(ConfigError, match="SIDECAR_UPSTREAM_URL: plain http"):
        load_settings({**BASE, "SIDECAR_UPSTREAM_URL": "http://api.localhost/prod"})


def test_secret_files_toml_and_precedence(tmp_path: Path):
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    token_file = tmp_path / "refresh"
    token_file.write_text(REFRESH + "\n")
    config = tmp_path / "sidecar.toml"
    config.write_text(
        'upstream_url = "https://abc.execute-api.eu-west-1.amazonaws.com/v1"\n'
        'token_url = "https://x.auth.eu-west-1.amazoncognito.com/oauth2/token"\n'
        'client_id = "from-file"\nheader_prefix = "Bearer "\n'
        f'refresh_token_file = "{token_file}"\n'
    )
    env = {
        "SIDECAR_CONFIG": str(config),
        "SIDECAR_CLIENT_ID": "from-env",
        "SIDECAR_CLIENT_SECRET_FILE": str(secret_file),
    }
    settings = load_settings(env)
    assert settings.client_id == "from-env"
    assert settings.header_prefix == "Bearer "
    assert settings.client_secret is not None and settings.client_secret.get_secret_value() == SECRET
    assert settings.refresh_token.get_secret_value() == REFRESH
    assert settings.refresh_token_file == token_file


def test_missing_and_conflicting_secret_files(tmp_path: Path):
    env = {**BASE, "SIDECAR_CLIENT_SECRET_FILE": str(tmp_path / "absent")}
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert "set either SIDECAR_CLIENT_SECRET or SIDECAR_CLIENT_SECRET_FILE" in str(info.value)
    env = {**BASE, "SIDECAR_REFRESH_TOKEN_FILE": str(tmp_path / "absent")}
    del env["SIDECAR_REFRESH_TOKEN"]
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env)


@pytest.mark.parametrize("example", ["sidecar.toml", "routes.toml", "example.env"])
def test_the_example_configurations_load(example: str, tmp_path: Path):
    root = Path(__file__).resolve().parents[2] / "config"
    for name in ("cognito_client_secret", "cognito_refresh_token", "catalog_api_key", "billing_client_secret"):
        (tmp_path / name).write_text(f"example-{name}\n")
    text = (root / example).read_text().replace("/run/secrets", str(tmp_path))
    if example.endswith(".toml"):
        (tmp_path / example).write_text(text)
        settings = load_settings({"SIDECAR_CONFIG": str(tmp_path / example)})
    else:
        env = dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))
        settings = load_settings(env)
    assert settings.effective_routes()
    assert "example-cognito" not in repr(settings)


def test_route_problems_are_listed_with_their_place(tmp_path: Path):
    config = _config(
        tmp_path,
        """
[[routes]]
prefix = "orders"
upstream_url = "ftp://x"

[[routes]]
prefix = "/-/metrics"
upstream_url = "https://abc.execute-api.us-east-1.amazonaws.com/prod"
colour = "blue"

[[routes]]
prefix = "/a"
upstream_url = "https://abc.execute-api.us-east-1.amazonaws.com/prod"
client_id = "another-client"
""",
    )
    env = {
        "SIDECAR_CONFIG": config,
        "SIDECAR_COGNITO_DOMAIN": "https://my.auth.us-east-1.amazoncognito.com",
        "SIDECAR_CLIENT_ID": "c",
        "SIDECAR_REFRESH_TOKEN": "r",
    }
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    text = str(info.value)
    assert "routes[0] (orders): upstream_url: must be an http:// or https:// URL" in text
    assert "routes[0] (orders): prefix: must be a plain path" in text
    assert "routes[1] (/-/metrics): unknown key 'colour'" in text
    assert "routes[2] (/a): refresh_token: is required" in text


def test_a_route_with_another_token_endpoint_inherits_no_secret(tmp_path: Path):
    env = {
        "SIDECAR_COGNITO_DOMAIN": "https://mine.auth.us-east-1.amazoncognito.com",
        "SIDECAR_CLIENT_ID": "c",
        "SIDECAR_CLIENT_SECRET": "top-level-secret",
        "SIDECAR_REFRESH_TOKEN": "top-level-refresh",
    }
    other = 'prefix = "/x"\nupstream_url = "https://abc.execute-api.us-east-1.amazonaws.com/prod"\n'
    other += 'cognito_domain = "https://elsewhere.auth.us-east-1.amazoncognito.com"\n'
    with pytest.raises(ConfigError) as info:
        load_settings({**env, "SIDECAR_CONFIG": _config(tmp_path, f"[[routes]]\n{other}")})
    text = str(info.value)
    assert "routes[0] (/x): client_secret: this route's token endpoint is not the top level's" in text
    assert "routes[0] (/x): refresh_token: is required" in text
    assert "top-level-secret" not in text and "top-level-refresh" not in text

    (tmp_path / "own-secret").write_text("own-secret\n")
    (tmp_path / "own-refresh").write_text("own-refresh\n")
    own = f'client_secret_file = "{tmp_path / "own-secret"}"\nrefresh_token_file = "{tmp_path / "own-refresh"}"\n'
    settings = load_settings({**env, "SIDECAR_CONFIG": _config(tmp_path, f"[[routes]]\n{other}{own}")})
    (route,) = settings.routes
    assert route.token_url == "https://elsewhere.auth.us-east-1.amazoncognito.com/oauth2/token"
    assert route.client_secret is not None and route.client_secret.get_secret_value() == "own-secret"
    assert route.refresh_token is not None and route.refresh_token.get_secret_value() == "own-refresh"
    # The same endpoint spelt as a token URL is not another endpoint: the route inherits as before.
    same = 'prefix = "/y"\nupstream_url = "https://abc.execute-api.us-east-1.amazonaws.com/prod"\n'
    same += 'token_url = "https://mine.auth.us-east-1.amazoncognito.com/oauth2/token"\n'
    (route,) = load_settings({**env, "SIDECAR_CONFIG": _config(tmp_path, f"[[routes]]\n{same}")}).routes
    assert route.client_secret is not None and route.client_secret.get_secret_value() == "top-level-secret"


@pytest.mark.parametrize(
    ("value", "problem"),
    [("127.0.0.1:8080", "another port than SIDECAR_LISTEN"), ("unix:/run/m.sock", "must be host:port")],
)
def test_a_metrics_listener_that_cannot_work_is_a_clear_configuration_error(value: str, problem: str):
    env = {
        "SIDECAR_UPSTREAM_URL": "https://abc.execute-api.us-east-1.amazonaws.com/prod",
        "SIDECAR_COGNITO_DOMAIN": "https://x.auth.us-east-1.amazoncognito.com",
        "SIDECAR_CLIENT_ID": "client",
        "SIDECAR_REFRESH_TOKEN": "refresh",
        "SIDECAR_LISTEN": "127.0.0.1:8080",
        "SIDECAR_METRICS_LISTEN": value,
    }
    with pytest.raises(ConfigError, match=f"SIDECAR_METRICS_LISTEN: .*{problem}"):
        load_settings(env)


def test_access_log_and_logger_levels_parse_from_the_environment_and_toml(tmp_path: Path):
    settings = load_settings(BASE)
    assert settings.access_log_exclude == ("/-/",)
    assert (settings.access_log_sample, settings.log_levels) == (1.0, ())
    env = {
        **BASE,
        "SIDECAR_ACCESS_LOG_EXCLUDE": "/-/, /health",
        "SIDECAR_ACCESS_LOG_SAMPLE": "0.1",
        "SIDECAR_LOG_LEVELS": "httpx2=INFO, proxy.shared=debug",
    }
    settings = load_settings(env)
    assert settings.access_log_exclude == ("/-/", "/health")
    assert settings.access_log_sample == 0.1
    assert settings.log_levels == (("httpx2", "info"), ("proxy.shared", "debug"))
    assert load_settings({**BASE, "SIDECAR_ACCESS_LOG_EXCLUDE": ""}).access_log_exclude == ()
    toml = _config(tmp_path, 'access_log_exclude = ["/-/"]\nlog_levels = { httpx2 = "info" }\n')
    settings = load_settings({**BASE, "SIDECAR_CONFIG": toml})
    assert settings.log_levels == (("httpx2", "info"),)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("SIDECAR_ACCESS_LOG_EXCLUDE", "health", "'health' must be a path prefix starting with /"),
        ("SIDECAR_ACCESS_LOG_SAMPLE", "1.5", "less than or equal to 1"),
        ("SIDECAR_LOG_LEVELS", "httpx2", "httpx2=: each must be logger=level"),
        ("SIDECAR_LOG_LEVELS", "httpx2=loud", "httpx2=loud: each must be logger=level with a level among debug"),
        ("SIDECAR_LOG_LEVELS", "=info", r"\(no logger\)=info"),
    ],
)
def test_bad_log_settings_say_what_to_write(name: str, value: str, problem: str):
    with pytest.raises(ConfigError, match=f"{name}: .*{problem}"):
        load_settings({**BASE, name: value})


def test_list_settings_of_the_wrong_shape_in_toml_are_problems_not_crashes(tmp_path: Path):
    toml = _config(
        tmp_path,
        "allowed_hosts = 5\naccess_log_exclude = true\nallow_from = 10\nlog_levels = 3\n"
        'allowed_origins = ["https://a.b", 7]\n',
    )
    with pytest.raises(ConfigError) as info:
        load_settings({**BASE, "SIDECAR_CONFIG": toml})
    listed = "must be a list: words separated by commas, or an array in the TOML file"
    assert list(info.value.problems) == [
        f"SIDECAR_ACCESS_LOG_EXCLUDE: {listed}",
        f"SIDECAR_LOG_LEVELS: {listed}",
        f"SIDECAR_ALLOWED_HOSTS: {listed}",
        "SIDECAR_ALLOWED_ORIGINS: Input should be a valid string",
        f"SIDECAR_ALLOW_FROM: must be CIDRs such as 10.0.0.0/8, fc00::/7 ({listed})",
    ]


@pytest.mark.parametrize(
    ("bound", "usable"),
    [
        ("http://0.0.0.0:9000", "http://127.0.0.1:9000"),
        ("http://[::]:9000", "http://[::1]:9000"),
        ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ],
)
def test_the_emulator_prints_urls_this_machine_can_call(bound: str, usable: str):
    from proxy.commands.demo import _usable

    assert _usable(bound) == usable


# Whatever a user writes, loading ends in settings or in a list of problems: never a traceback, never a secret in a
# message. Keys that name files to read (*_file, SIDECAR_CONFIG) are left out: their values would be read.
_KEYS = sorted(key for key, _ in described())  # every setting a user sets; the routes have their own strategy
_SCALARS = st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_ROUTE = st.fixed_dictionaries(
    {"prefix": st.sampled_from(["/a", "/b/", "a", "/-/x", "/a/../b"])},
    optional={key: _VALUES for key in ("upstream_url", "methods", "paths", "client_id", "strip_prefix", "grant")},
)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are TOML's
    if isinstance(value, list):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(key)} = {_toml(item)}" for key, item in value.items()) + "}"


def _secrets_of(*sources: dict[str, Any]) -> list[str]:
    """The values given to secret settings that no other setting was given (a message may quote those)."""
    given = [(key, str(value)) for source in sources for key, value in source.items()]
    public = [value for key, value in given if key not in FILE_KEYS]
    return [
        value for key, value in given if key in FILE_KEYS and len(value) >= 8 and not any(value in p for p in public)
    ]


@settings(max_examples=300, deadline=None)
@given(
    env=st.dictionaries(st.sampled_from(_KEYS), st.text(max_size=24), max_size=4),
    toml=st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4),
    routes=st.lists(_ROUTE, max_size=2),
)
def test_any_values_load_or_are_listed_problems_without_their_secrets(
    tmp_path_factory: pytest.TempPathFactory, env: dict[str, str], toml: dict[str, Any], routes: list[dict[str, Any]]
):
    text = "".join(f"{key} = {_toml(value)}\n" for key, value in toml.items() if key != "routes")
    text += f"routes = {_toml(routes)}\n" if routes else ""
    path = tmp_path_factory.mktemp("config") / "sidecar.toml"
    path.write_text(text)
    variables = {**BASE, **{f"SIDECAR_{key.upper()}": value for key, value in env.items()}, "SIDECAR_CONFIG": str(path)}
    secrets = _secrets_of(env, toml, {"routes": routes})
    try:
        loaded = load_settings(variables)
        report = repr(loaded) + effective_text(effective(loaded))
    except ConfigError as exc:  # anything else fails the test, with its traceback
        report = str(exc)
    assert not any(secret in report for secret in secrets)
