"""Who is on the other end of the Unix socket, and may they talk to moldd.

The kernel vouches for the peer's uid/gid/pid (``SO_PEERCRED``, taken at ``connect()``), so nothing the
client sends can change who it is. :func:`authorize` is the whole rule, as a pure function.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import grp
import os
import pwd
import socket
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from moldd.app.bus import Actor
from moldd.domain.errors import PermissionDenied

_UCRED = struct.Struct("iII")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; } (ids unsigned)


@dataclass(frozen=True)
class PeerCreds:
    pid: int
    uid: int
    gid: int


def peer_creds(sock: socket.socket) -> PeerCreds:
    """The credentials of the process that connected ``sock`` (an ``AF_UNIX`` stream socket)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCreds(pid=pid, uid=uid, gid=gid)


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux ≥ 4.13: the peer's groups at connect()
_GID = struct.Struct("I")


def peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """The peer's supplementary groups as the kernel recorded them at ``connect()`` (``SO_PEERGROUPS``), or
    ``None`` where the kernel does not give them."""
    size = 64 * _GID.size
    for _ in range(3):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE and size < 65536 * _GID.size:
                size = 65536 * _GID.size
                continue
            return None
        return tuple(g for (g,) in _GID.iter_unpack(raw[: len(raw) - len(raw) % _GID.size]))
    return None


def authorize(
    creds: PeerCreds,
    allowed_group_gid: int | None,
    *,
    daemon_uid: int,
    supplementary_gids: Collection[int] = (),
) -> None:
    """Allow root, the daemon's own uid, and members of the allowed group; refuse everyone else.

    Membership counts through the peer's primary gid (as the kernel reports it) or any of its
    supplementary groups. ``allowed_group_gid=None`` admits only root and the daemon's uid.
    """
    if creds.uid in (0, daemon_uid):
        return
    if allowed_group_gid is not None and (
        creds.gid == allowed_group_gid or allowed_group_gid in supplementary_gids
    ):
        return
    group = _group_name(allowed_group_gid)
    raise PermissionDenied(
        f"uid {creds.uid} may not use moldd: only root, uid {daemon_uid}"
        + (f" and members of group {group!r}" if group else "")
        + " are allowed"
    )


def _group_name(gid: int | None) -> str | None:
    if gid is None:
        return None
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def supplementary_gids(user: str | None, gid: int) -> list[int]:
    """The groups of ``user`` from the group database (``os.getgrouplist``); ``[gid]`` when unknown."""
    if user is None:
        return [gid]
    try:
        return os.getgrouplist(user, gid)
    except (OSError, OverflowError):
        return [gid]


class AccessPolicy:
    """Applies :func:`authorize` to live peers, caching the (NSS) user and group look-ups briefly.

    Group changes take effect within ``cache_ttl_s``; the cache also keeps a burst of requests from
    one client from hitting ``/etc/group`` (or LDAP) each time.
    """

    def __init__(
        self,
        allowed_group_gid: int | None,
        *,
        daemon_uid: int | None = None,
        cache_ttl_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        group_role: str = "admin",
        admin_group_gid: int | None = None,
    ) -> None:
        self.allowed_group_gid = allowed_group_gid
        # Roles on the socket ([roles] in the config): root and the daemon's uid are admins, members of
        # ``admin_group_gid`` too; the other members of the socket group get ``group_role``.
        self.group_role = group_role
        self.admin_group_gid = admin_group_gid
        self.daemon_uid = os.getuid() if daemon_uid is None else daemon_uid
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[tuple[int, int], tuple[float, str | None, tuple[int, ...]]] = {}
        self._pending: dict[tuple[int, int], asyncio.Future[tuple[str | None, tuple[int, ...]]]] = {}

    def _lookup(self, uid: int, gid: int) -> tuple[str | None, tuple[int, ...]]:
        now = self._clock()
        hit = self._cache.get((uid, gid))
        if hit is not None and now - hit[0] < self._ttl:
            return hit[1], hit[2]
        name = user_name(uid)
        groups = tuple(supplementary_gids(name, gid))
        if len(self._cache) > 1024:
            self._cache.clear()
        self._cache[(uid, gid)] = (now, name, groups)
        return name, groups

    def actor_for(self, creds: PeerCreds) -> Actor:
        """The :class:`Actor` for an allowed peer; raises ``PermissionDenied`` for any other. Blocking (NSS):
        the daemon uses :meth:`async_actor_for`."""
        name, groups = self._lookup(creds.uid, creds.gid)
        return self._actor(creds, name, groups)

    async def async_actor_for(self, creds: PeerCreds, sock: socket.socket | None = None) -> Actor:
        """:meth:`actor_for` without blocking the loop: the peer's groups come from the kernel
        (``SO_PEERGROUPS``) where it gives them, and the user name / group database look-ups (NSS: files, SSSD,
        LDAP ...) run on a thread, one at a time per (uid, gid), cached for ``cache_ttl_s``."""
        kernel_groups = peer_groups(sock) if sock is not None else None
        name, nss_groups = await self._async_lookup(creds.uid, creds.gid)
        groups = kernel_groups if kernel_groups is not None else nss_groups
        return self._actor(creds, name, groups)

    def valid_until(self, creds: PeerCreds) -> float:
        """Until when (on this policy's clock) an answer of :meth:`async_actor_for` for ``creds`` stands: the
        expiry of the cached user and group look-up it came from (``-inf`` when none is cached). A connection
        keeps its :class:`Actor` until then (its kernel credentials and groups are fixed at ``connect()``), so
        group changes still take effect within ``cache_ttl_s``."""
        hit = self._cache.get((creds.uid, creds.gid))
        return hit[0] + self._ttl if hit is not None else -float("inf")

    def now(self) -> float:
        return self._clock()

    def _actor(self, creds: PeerCreds, name: str | None, groups: Collection[int]) -> Actor:
        """Allowed or not (:func:`authorize`), and the role: root, the daemon's uid and members of the admin
        group are admins; the other members of the socket group get ``group_role``."""
        admin = creds.uid in (0, self.daemon_uid) or (
            self.admin_group_gid is not None
            and (creds.gid == self.admin_group_gid or self.admin_group_gid in groups)
        )
        if not admin:
            authorize(creds, self.allowed_group_gid, daemon_uid=self.daemon_uid, supplementary_gids=groups)
        role = "admin" if admin else self.group_role
        return Actor(uid=creds.uid, gid=creds.gid, pid=creds.pid, user=name, role=role)

    async def _async_lookup(self, uid: int, gid: int) -> tuple[str | None, tuple[int, ...]]:
        hit = self._cache.get((uid, gid))
        if hit is not None and self._clock() - hit[0] < self._ttl:
            return hit[1], hit[2]
        key = (uid, gid)
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(self._lookup, uid, gid))
            self._pending[key] = pending
            pending.add_done_callback(functools.partial(self._looked_up, key))
        return await asyncio.shield(pending)

    def _looked_up(self, key: tuple[int, int], fut: asyncio.Future[Any]) -> None:
        self._pending.pop(key, None)
        if not fut.cancelled():
            fut.exception()
