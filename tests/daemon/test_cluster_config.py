"""[daemon] database = "postgresql://..." and the [cluster] section: accepted, and refused with the key and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moldd.config import ConfigError, parse_config

DSN = "postgresql://moldd@db1,db2/moldd?target_session_attrs=read-write"
HOSTS = [{"name": "h1", "uri": "test:///default"}]


def parse(doc: dict, file: Path) -> object:
    return parse_config({**doc, "hosts": HOSTS}, file)


def test_a_postgresql_database_and_cluster_timings_are_read(tmp_path: Path) -> None:
    cfg: Any = parse(
        {
            "daemon": {"database": DSN},
            "cluster": {"node": "mgmt1", "lease_s": 6, "heartbeat_s": 1, "fence_after_s": 4},
        },
        tmp_path / "moldd.toml",
    )
    assert cfg.database_dsn == DSN
    assert (cfg.cluster.node, cfg.cluster.schema, cfg.cluster.lease_s, cfg.cluster.fence_after_s) == (
        "mgmt1",
        "events",
        6.0,
        4.0,
    )


def test_a_file_database_stays_a_file(tmp_path: Path) -> None:
    cfg: Any = parse({"daemon": {"database": "log.db"}}, tmp_path / "moldd.toml")
    assert cfg.database_dsn is None and cfg.database == tmp_path / "log.db"
    from moldd.cluster import node_name

    assert cfg.cluster.node == "" and node_name(cfg)  # defaults to the host name


@pytest.mark.parametrize(
    ("doc", "key", "reason"),
    [
        ({"daemon": {"database": "log.db"}, "cluster": {"node": "a"}}, "cluster", "postgresql://"),
        (
            {"daemon": {"database": DSN}, "cluster": {"lease_s": 3, "fence_after_s": 3}},
            "cluster.fence_after_s",
            "less than lease_s",
        ),
        (
            {"daemon": {"database": DSN}, "cluster": {"heartbeat_s": 4}},
            "cluster.heartbeat_s",
            "less than fence_after_s",
        ),
        ({"daemon": {"database": DSN}, "cluster": {"lease_s": 0}}, "cluster.lease_s", "greater than 0"),
        ({"daemon": {"database": DSN}, "cluster": {"lease_s": "5"}}, "cluster.lease_s", "a valid number"),
        ({"daemon": {"database": DSN}, "cluster": {"nodes": "x"}}, "cluster.nodes", "unknown key"),
        ({"daemon": {"database": DSN}, "cluster": {"node": "a\nb"}}, "cluster.node", "control characters"),
        ({"daemon": {"database": DSN}, "cluster": "x"}, "cluster", "table"),
    ],
)
def test_bad_cluster_settings_are_refused_with_the_key(
    tmp_path: Path, doc: dict, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc, tmp_path / "moldd.toml")
    assert info.value.key == key and reason in info.value.reason
