"""How a redis+cluster:// URL names a Redis Cluster: one node or several, with the credentials and options of all."""

from __future__ import annotations

import pytest

from services.shared.redis_client import cluster_nodes, is_cluster_url


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis+cluster://10.0.0.5:6379", True),
        ("rediss+cluster://10.0.0.5:6379", True),
        ("REDIS+CLUSTER://10.0.0.5:6379", True),
        ("redis://10.0.0.5:6379/0", False),
        ("rediss://10.0.0.5:6379/0", False),
    ],
)
def test_only_the_cluster_schemes_name_a_cluster(url: str, cluster: bool) -> None:
    assert is_cluster_url(url) is cluster


def test_one_node_becomes_its_redis_url() -> None:
    assert cluster_nodes("redis+cluster://10.0.0.5:7000") == ("redis://10.0.0.5:7000", [])
    assert cluster_nodes("rediss+cluster://10.0.0.5:7000") == ("rediss://10.0.0.5:7000", [])


def test_several_nodes_keep_the_credentials_and_options_on_the_first_and_list_the_others() -> None:
    first, others = cluster_nodes("redis+cluster://user:s3cret@10.0.0.5:7000,10.0.0.6:7001,node-c/0?ssl_cert_reqs=none")

    assert first == "redis://user:s3cret@10.0.0.5:7000/0?ssl_cert_reqs=none"
    assert others == [("10.0.0.6", 7001), ("node-c", 6379)]


def test_ipv6_nodes_lose_their_brackets_for_the_client() -> None:
    assert cluster_nodes("redis+cluster://[::1]:7000,[::1]:7001?x=1") == ("redis://[::1]:7000?x=1", [("::1", 7001)])
