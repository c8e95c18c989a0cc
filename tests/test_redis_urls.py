"""Redis URLs: single servers, Redis Cluster and Sentinel, with credentials that never reach a log."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import load
from sidecar.errors import ConfigError
from sidecar.redis.urls import Target, hash_tag, is_redis, parse, redact


def test_a_single_server_url_is_kept_whole() -> None:
    assert parse("redis://u:p@h:6380/2") == Target("server")
    assert parse("rediss://h") == Target("server", tls=True)


def test_cluster_urls_name_their_seed_nodes_and_credentials() -> None:
    target = parse("rediss+cluster://user:s%40cret@10.0.0.1:7000,[::1]:7001,redis-2")
    assert target == Target("cluster", (("10.0.0.1", 7000), ("::1", 7001), ("redis-2", 6379)), db=0,
                            username="user", password="s@cret", tls=True)
    assert parse("redis+cluster://h:1?password=x").password == "x"


def test_sentinel_urls_name_the_service_and_a_db() -> None:
    target = parse("redis+sentinel://:pw@s1:26379,s2/mymaster/3?sentinel_password=sp")
    assert (target.kind, target.nodes, target.service, target.db) == (
        "sentinel", (("s1", 26379), ("s2", 26379)), "mymaster", 3)
    assert (target.password, target.sentinel_password) == ("pw", "sp")


@pytest.mark.parametrize("url", ["redis+sentinel://s1:26379", "redis+cluster://h:1/2", "redis+cluster://",
                                 "redis+cluster://h:port", "redis+sentinel://s/m/x", "memcached://h"])
def test_what_names_no_redis_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse(url)


@given(st.text(alphabet="abcdefghijklmnop:@%", min_size=1, max_size=12))
def test_redacted_urls_never_show_a_password(password: str) -> None:
    for scheme in ("redis", "rediss", "redis+cluster", "redis+sentinel"):
        url = f"{scheme}://user:{password}x@h1:1,h2:2/svc?password={password}y"
        shown = redact(url)
        assert f"{password}x" not in shown and f"{password}y" not in shown


def test_every_scheme_is_redis_and_a_bad_one_stops_start_up() -> None:
    assert all(is_redis(u) for u in ("redis+cluster://h:1", "rediss+sentinel://h/m", "unix:///s.sock"))
    assert hash_tag("ns") == "{ns}"
    with pytest.raises(ConfigError, match=r"cache\.redis"):
        load({}, {}, {"cache.redis": "redis-cluster://h:1"})
    with pytest.raises(ConfigError, match="store"):
        load({}, {}, {"store": "redis+clutser://h:1"})
