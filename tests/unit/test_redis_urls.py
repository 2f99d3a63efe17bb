"""What a Redis store URL names: one server, Sentinel or Cluster, and what is wrong with a bad one. No server."""

from __future__ import annotations

import pytest

from proxy.store.redis import RedisTarget


def test_each_kind_of_url_and_its_name_without_the_password():
    single = RedisTarget.parse("rediss://:hunter2@redis.internal:6380/2?ssl_ca_certs=/ca.pem")
    assert (single.kind, single.tls, single.hosts, single.db) == ("single", True, (("redis.internal", 6380),), 2)
    assert single.name == "rediss://redis.internal:6380/2" and "hunter2" not in single.name
    sentinel = RedisTarget.parse("redis+sentinel://:pw@s1,s2:26380/orders/1")
    assert (sentinel.kind, sentinel.hosts) == ("sentinel", (("s1", 26379), ("s2", 26380)))
    assert (sentinel.service, sentinel.db, sentinel.name) == (
        "orders",
        1,
        "redis+sentinel://s1:26379,s2:26380/orders/1",
    )
    cluster = RedisTarget.parse("rediss+cluster://node:7000")
    assert (cluster.kind, cluster.tls, cluster.url) == ("cluster", True, "rediss://node:7000")
    assert RedisTarget.parse("redis://[::1]/0").name == "redis://[::1]:6379/0"


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis+sentinel://s1:26379", "names the service"),
        ("redis+cluster://node:7000/3", "only database 0"),
        ("redis://a:1,b:2/0", "only a Sentinel URL lists several hosts"),
        ("redis://host/zero", "must be a number"),
        ("redis+pool://host", "unknown scheme"),
        ("redis:///0", "needs a host"),
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, said: str):
    with pytest.raises(ValueError, match=said):
        RedisTarget.parse(url)
