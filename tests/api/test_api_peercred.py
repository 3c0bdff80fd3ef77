"""Who may use the socket: the pure rule, the cached policy, and a real refusal across uids."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
from pathlib import Path

import pytest

from moldd.api import ApiServer, PeerCreds, authorize, bind_unix_socket, peer_creds, peercred
from moldd.api.handlers import http_status
from moldd.api.peercred import AccessPolicy
from moldd.domain.errors import PermissionDenied
from tests.api.conftest import FakeBus

MOLDD_GID = 2000
DAEMON_UID = 900


@pytest.mark.parametrize(
    ("creds", "groups"),
    [
        (PeerCreds(pid=1, uid=0, gid=0), ()),  # root
        (PeerCreds(pid=1, uid=DAEMON_UID, gid=DAEMON_UID), ()),  # the daemon itself
        (PeerCreds(pid=1, uid=1000, gid=MOLDD_GID), ()),  # primary group
        (PeerCreds(pid=1, uid=1000, gid=1000), (1000, 27, MOLDD_GID)),  # supplementary group
    ],
)
def test_authorize_allows_root_daemon_uid_and_group_members(
    creds: PeerCreds, groups: tuple[int, ...]
) -> None:
    authorize(creds, MOLDD_GID, daemon_uid=DAEMON_UID, supplementary_gids=groups)


def test_authorize_refuses_other_users_with_permission_denied() -> None:
    with pytest.raises(PermissionDenied) as info:
        authorize(
            PeerCreds(pid=1, uid=1000, gid=1000),
            MOLDD_GID,
            daemon_uid=DAEMON_UID,
            supplementary_gids=(1000, 27),
        )
    assert info.value.code == "permission_denied"
    assert http_status(info.value) == 403
    assert "uid 1000" in info.value.message


def test_authorize_without_a_group_admits_only_root_and_daemon() -> None:
    authorize(PeerCreds(1, 0, 0), None, daemon_uid=DAEMON_UID)
    with pytest.raises(PermissionDenied):
        authorize(PeerCreds(1, 1000, MOLDD_GID), None, daemon_uid=DAEMON_UID, supplementary_gids=(MOLDD_GID,))


def test_access_policy_caches_user_lookups_until_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[int] = []

    def user_name(uid: int) -> str:
        looked_up.append(uid)
        return "alice"

    monkeypatch.setattr(peercred, "user_name", user_name)
    monkeypatch.setattr(peercred, "supplementary_gids", lambda user, gid: [gid, MOLDD_GID])
    now = [0.0]
    policy = AccessPolicy(MOLDD_GID, daemon_uid=DAEMON_UID, cache_ttl_s=10, clock=lambda: now[0])
    actor = policy.actor_for(PeerCreds(pid=42, uid=1000, gid=1000))
    assert (actor.uid, actor.gid, actor.pid, actor.user) == (1000, 1000, 42, "alice")
    policy.actor_for(PeerCreds(pid=43, uid=1000, gid=1000))
    assert looked_up == [1000]
    now[0] = 11.0
    policy.actor_for(PeerCreds(pid=44, uid=1000, gid=1000))
    assert looked_up == [1000, 1000]


def test_peer_creds_of_a_socketpair_is_this_process() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_creds(a) == PeerCreds(pid=os.getpid(), uid=os.getuid(), gid=os.getgid())


def test_bound_socket_has_mode_and_group(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    with bind_unix_socket(path, mode=0o660, gid=os.getgid()):
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == os.getgid()


def test_stale_socket_is_replaced_but_a_live_one_is_not(sock_dir: Path) -> None:
    path = sock_dir / "s.sock"
    live = bind_unix_socket(path)
    with pytest.raises(OSError, match="already serving"):
        bind_unix_socket(path)
    live.close()  # the file stays behind, as after a crash
    bind_unix_socket(path).close()


def _request_as_nobody(path: str) -> bytes:
    """Fork, drop to uid/gid 65534 with no supplementary groups, send one command, return the raw reply."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only raw syscalls from here on
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            body = b'{"command": "echo"}'
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(b"POST /v1/command HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)  # fmt: skip
            while chunk := s.recv(65536):
                os.write(write_fd, chunk)
        finally:
            os._exit(0)
    os.close(write_fd)
    data = b""
    while chunk := os.read(read_fd, 65536):
        data += chunk
    os.close(read_fd)
    os.waitpid(pid, 0)
    return data


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
async def test_a_user_outside_the_group_is_refused_with_403(
    server: ApiServer, bus: FakeBus, sock_dir: Path
) -> None:
    assert server.path is not None
    os.chmod(sock_dir, 0o755)
    os.chmod(server.path, 0o666)  # let the kernel through so moldd's own check is what refuses
    raw = await asyncio.to_thread(_request_as_nobody, server.path)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == 403
    assert json.loads(payload)["error"]["code"] == "permission_denied"
    assert bus.calls == []


def test_peer_creds_reads_uid_and_gid_as_unsigned() -> None:
    """uid_t/gid_t are unsigned: a uid above 2**31 (user namespaces, nobody = 4294967294 on some systems)
    must not come out negative (a wrong actor in the log, and a 500 from the group look-up)."""
    import struct

    class FakeSock:
        def getsockopt(self, *_: object) -> bytes:
            return struct.pack("iII", 4242, 4294967294, 3000000000)

    assert peer_creds(FakeSock()) == PeerCreds(pid=4242, uid=4294967294, gid=3000000000)  # type: ignore[arg-type]
