"""The [cloudstack] and [roles] config sections, and roles on the Unix socket (no lab needed)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import pytest

from moldd.api.cloudstack.server import tls_context
from moldd.api.peercred import AccessPolicy, PeerCreds
from moldd.config import ConfigError, parse_config
from moldd.domain.errors import PermissionDenied

HOSTS = {"hosts": [{"name": "h1", "uri": "test:///default"}]}


def parse(**sections: Any) -> Any:
    return parse_config(HOSTS | sections, Path("/etc/moldd/moldd.toml"))


def test_defaults_no_tcp_listener_and_socket_group_is_operator() -> None:
    cfg = parse()
    assert cfg.cloudstack.port is None and cfg.roles.socket_group_role == "operator"


@pytest.mark.parametrize(
    ("sections", "key"),
    [
        ({"cloudstack": {"port": 8080, "bind": "0.0.0.0"}}, "cloudstack.bind"),  # TCP off loopback needs TLS
        ({"cloudstack": {"port": 70000}}, "cloudstack.port"),
        ({"cloudstack": {"port": "8080"}}, "cloudstack.port"),
        ({"cloudstack": {"tls_cert": "/x.pem"}}, "cloudstack.tls_key"),
        ({"cloudstack": {"rate_per_s": 0}}, "cloudstack.rate_per_s"),
        ({"cloudstack": {"secret": "x"}}, "cloudstack.secret"),
        ({"roles": {"socket_group_role": "root"}}, "roles.socket_group_role"),
        ({"roles": {"admin": "wheel"}}, "roles.admin"),
    ],
)
def test_bad_sections_are_refused_naming_the_key(sections: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse(**sections)
    assert refused.value.key == key


def test_tcp_with_tls_may_listen_anywhere() -> None:
    cfg = parse(cloudstack={"port": 8443, "bind": "0.0.0.0", "tls_cert": "c.pem", "tls_key": "k.pem"})
    assert cfg.cloudstack.tls_cert == Path("/etc/moldd/c.pem")


def test_tls_context_refuses_versions_below_1_2(tmp_path: Path) -> None:
    import subprocess

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)  # fmt: skip
    ctx = tls_context(cert, key)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_socket_roles_root_admin_group_member_operator_others_refused() -> None:
    policy = AccessPolicy(5000, daemon_uid=os.getuid(), group_role="operator", admin_group_gid=6000)
    policy._lookup = lambda uid, gid: (None, (gid,))  # type: ignore[method-assign]  # no NSS in a unit test
    assert policy.actor_for(PeerCreds(pid=1, uid=0, gid=0)).role == "admin"
    assert policy.actor_for(PeerCreds(pid=1, uid=1234, gid=5000)).role == "operator"
    assert policy.actor_for(PeerCreds(pid=1, uid=1234, gid=6000)).role == "admin"
    with pytest.raises(PermissionDenied):
        policy.actor_for(PeerCreds(pid=1, uid=1234, gid=7000))


async def test_a_tcp_listener_cannot_be_built_without_signatures() -> None:
    from moldd.api.cloudstack import CloudStackEndpoint, CloudStackSettings, async_serve_tcp

    endpoint = CloudStackEndpoint(bus=None, directory=None, settings=CloudStackSettings(), tcp=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="signed"):
        await async_serve_tcp(endpoint, "127.0.0.1", 0)
