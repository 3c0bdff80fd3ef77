"""The socket API: aiohttp over a Unix socket, translating HTTP ⇄ :class:`moldd.app.bus.CommandBus`.

Start it with :func:`async_serve` (``await server.async_close()`` to stop), or build the bare application
with :func:`make_app` to run it some other way.
"""

from moldd.api.app import make_app
from moldd.api.keys import ApiSettings
from moldd.api.peercred import AccessPolicy, PeerCreds, authorize, peer_creds
from moldd.api.serve import ApiServer, async_serve, bind_unix_socket

__all__ = [
    "AccessPolicy",
    "ApiServer",
    "ApiSettings",
    "PeerCreds",
    "async_serve",
    "authorize",
    "bind_unix_socket",
    "make_app",
    "peer_creds",
]
