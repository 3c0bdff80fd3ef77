"""CloudStack's HTTP query API (``/client/api``) over moldd's bus, so CloudStack clients (``cs``, CloudMonkey,
Ansible, Terraform, Libcloud) work against moldd unchanged. A translation layer only: verbs, rules and
events stay in :mod:`moldd.app`."""

from moldd.api.cloudstack.handler import PATH, CloudStackEndpoint, CloudStackSettings, add_route
from moldd.api.cloudstack.server import TcpListener, async_serve_tcp, tls_context

__all__ = [
    "PATH",
    "CloudStackEndpoint",
    "CloudStackSettings",
    "TcpListener",
    "add_route",
    "async_serve_tcp",
    "tls_context",
]
