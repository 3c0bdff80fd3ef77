"""Two or more moldd on one PostgreSQL log: one leads (acts on the hosts), the others are warm standbys.

Election and fencing are events.leader's: a session advisory lock, a lease enforced by PostgreSQL and an
epoch that PostgreSQL checks in every appending transaction. This module is what moldd does with them:

* elected: catch the read model up with the log, append ``daemon.leader_elected {node, epoch, cause}``,
  then act as after a start: register and connect every host, resync it (jobs of the old epoch are found
  stale and reconciled with what libvirt shows), recover VMs of unreachable hosts, start HA and the sweepers.
* deposed (lock or connection lost, no answer within fence_after_s, superseded): at once the libvirt bridge
  refuses every call (its gate is ``is_leading()``, which turns false by itself when the process was paused
  past fence_after_s) and the store's appends carry no epoch (PostgreSQL refuses them); then HA and the
  sweepers stop, running jobs are abandoned (the next leader reconciles them) and the host connections
  close. The node stays up as a standby and campaigns again.
* standby: follows the log (LISTEN/NOTIFY) so its read model is current, answers read verbs, refuses every
  other verb with ``not_leader`` naming the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import TYPE_CHECKING, Any

import structlog

from events import NewEvent, StoredEvent
from events.leader import LEADER, Leadership, Timings
from moldd.cluster_secrets import API, HMAC_KEY, SETTINGS, SETTINGS_KEY, SharedSecrets, local_secrets
from moldd.domain.errors import InternalError, NotLeader

if TYPE_CHECKING:
    from moldd.daemon import Daemon

log = structlog.get_logger("moldd.cluster")


def node_name(config: Any) -> str:
    """[cluster] node, or this machine's host name."""
    return str(config.cluster.node) or socket.gethostname()


class ClusterRole:
    def __init__(self, daemon: Daemon) -> None:
        cfg = daemon.config.cluster
        self.daemon = daemon
        self.node = node_name(daemon.config)
        self.leadership = Leadership(
            daemon.store,
            self.node,
            Timings(lease_s=cfg.lease_s, heartbeat_s=cfg.heartbeat_s, fence_after_s=cfg.fence_after_s),
            on_elected=self._async_elected,
            on_deposed=self._deposed,
        )
        self.leader: str | None = None  # as the log says (daemon.leader_elected)
        self.epoch: int | None = None
        self.acting = False  # hosts, HA and sweepers run (only while leading)
        self.terms = 0
        self.last_takeover_s: float | None = None  # elected -> acting (hosts resynced, HA running)
        self._stand_down: asyncio.Task[None] | None = None
        self.secrets = SharedSecrets(daemon.store.dsn, daemon.store.schema)
        self._settings_secrets: Any = None
        self._reload: asyncio.Task[None] | None = None
        self._reload_again = False

    # ---- start / stop ----------------------------------------------------------------------------------
    async def async_start(self) -> None:
        d = self.daemon
        current = await d.store.async_current_epoch()
        if current is not None:
            self.epoch, self.leader = current[0], current[1]
        if d.projector is None or d.app is None:
            raise InternalError("the cluster role starts after the daemon's projector and app")
        await self._async_open_secrets()
        d.projector.add_listener(self._on_event)
        d.projector.may_snapshot = self.leadership.is_leading  # a snapshot's seal is an append
        d.bridge.gate = self.leadership.is_leading
        d.app.cluster = self
        self.leadership.start()

    async def async_stop(self) -> None:
        """Step down (a standby takes over at once) and wait until this node no longer acts."""
        await self.leadership.async_stop()
        if self._stand_down is not None:
            with contextlib.suppress(Exception):
                await self._stand_down
        if self._reload is not None:
            self._reload.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reload
        if self._settings_secrets is not None:
            self._settings_secrets.unregister(self.daemon.config)
        await self.secrets.async_close()

    # ---- the shared secrets (moldd.cluster_secrets) ---------------------------------------------------------
    async def _async_open_secrets(self) -> None:
        """The API secrets and secret settings come from PostgreSQL (every node may have to check a signature or
        start a VM with its VNC password); a first node of an existing installation seeds them from its files."""
        import secrets as random

        from moldd.app import secrets as settings_secrets
        from moldd.app.users import SecretStore as ApiSecrets
        from moldd.app.users import directory, secrets_path

        d, cfg = self.daemon, self.daemon.config
        if d.app is None:
            raise InternalError("the daemon's app is not built yet")
        await self.secrets.async_open()
        local = await asyncio.to_thread(
            local_secrets, secrets_path(cfg), cfg.database.parent / settings_secrets.FILE_NAME
        )
        await self.secrets.async_seed(local)
        await self.secrets.async_put(SETTINGS_KEY, {HMAC_KEY: random.token_hex(32)})  # the first node's key stays
        self._settings_secrets = settings_secrets.SecretStore.shared_for(cfg, self.secrets)
        d.app.secrets = self._settings_secrets
        users = directory(d.app)
        users.store = ApiSecrets(users.store.path, self.secrets)
        await self.async_reload_secrets()

    async def async_reload_secrets(self) -> None:
        """The shared table, again (when elected, before acting; after a user.* event was folded)."""
        from moldd.app.users import directory

        d = self.daemon
        if d.app is None or self._settings_secrets is None:
            return
        loaded = await self.secrets.async_load()
        self._settings_secrets.replace(loaded[SETTINGS_KEY][HMAC_KEY], loaded[SETTINGS])
        directory(d.app).store.replace(loaded[API])

    def _reload_soon(self) -> None:
        """One reload at a time; a request during one runs another after it (it may have missed the new row)."""
        if self._reload is not None and not self._reload.done():
            self._reload_again = True
            return

        async def run() -> None:
            while True:
                self._reload_again = False
                try:
                    await self.async_reload_secrets()
                except Exception as exc:  # the database is away: the next user.* event or election reloads
                    log.warning("secrets_reload_failed", error=f"{type(exc).__name__}: {exc}")
                if not self._reload_again:
                    return

        self._reload = asyncio.get_running_loop().create_task(run(), name="cluster-secrets-reload")

    # ---- the API's view ----------------------------------------------------------------------------------
    def is_leading(self) -> bool:
        return self.leadership.is_leading()

    def check_leading(self) -> None:
        """Writes are taken once this node leads AND has taken charge of the hosts (resynced, jobs of the old
        epoch reconciled): a command must not race the take-over's reconciliation."""
        leading = self.is_leading()
        if leading and self.acting:
            return
        if leading:
            raise NotLeader(
                f"this moldd ({self.node}) was just elected (epoch {self.leadership.epoch}) and is resyncing "
                "its hosts: retry in a moment",
                field="command",
            )
        if self.leader is None or self.leader == self.node:
            where = "no leader is elected yet (or the election is under way): retry in a few seconds"
        else:
            where = f"the leader is {self.leader} (epoch {self.epoch}): send writes to its socket"
        raise NotLeader(f"this moldd ({self.node}) is a standby; {where}", field="command")

    def info(self) -> dict[str, Any]:
        return {
            "role": LEADER if self.is_leading() else "standby",
            "node": self.node,
            "leader": self.leader,
            "epoch": self.epoch,
            "acting": self.acting,
        }

    async def async_status(self) -> dict[str, Any]:
        """For `moldctl cluster status`: every candidate connected to PostgreSQL, the epoch, this node's lag."""
        d = self.daemon
        status = await self.leadership.async_status()
        head, _ = await d.store.async_stored_head()
        if d.app is None:
            raise InternalError("the daemon's app is not built yet")
        position = d.app.model.position
        return status | {
            "this_node": self.node,
            "role": self.info()["role"],
            "acting": self.acting,
            "log_head": head,
            "position": position,
            "lag": max(0, head - position),
            "last_takeover_s": self.last_takeover_s,
        }

    def _on_event(self, ev: StoredEvent, model: Any) -> None:
        if ev.event_type == "daemon.leader_elected" and isinstance(ev.payload, dict):
            self.leader = ev.payload.get("node")
            self.epoch = ev.payload.get("epoch")
        elif ev.event_type.startswith("user.") and not self.leadership.is_leading():
            self._reload_soon()  # the leader wrote the new secret before this event: a standby picks it up

    # ---- elected / deposed -----------------------------------------------------------------------------
    async def _async_elected(self, epoch: int, cause: str) -> None:
        d = self.daemon
        started = time.monotonic()
        if self._stand_down is not None:  # the previous term's cleanup finishes first
            with contextlib.suppress(Exception):
                await self._stand_down
        if d.projector is None or d.app is None:
            raise InternalError("the daemon's projector and app are not built yet")
        await d.store.async_catch_up()
        await self.async_reload_secrets()  # every secret a previous leader shared, before this node acts
        head, _ = await d.store.async_stored_head()
        await d.projector.async_wait(head, timeout=120)
        await d.app.async_append(
            "daemon",
            [
                NewEvent(
                    "daemon.leader_elected",
                    {"node": self.node, "epoch": epoch, "cause": cause},
                    actor="system",
                )
            ],
        )
        self.terms += 1
        log.warning("leader_elected", node=self.node, epoch=epoch, cause=cause, position=head)
        self.acting = True
        await d.async_act()
        self.last_takeover_s = time.monotonic() - started
        log.info("leader_acting", node=self.node, epoch=epoch, took_s=round(self.last_takeover_s, 3))

    def _deposed(self, cause: str) -> None:
        # the bridge's gate is already false (role is standby): no libvirt call starts from here on
        log.warning("leadership_lost", node=self.node, epoch=self.leadership.epoch, cause=cause)
        if self.acting or self._stand_down is None or self._stand_down.done():
            self.acting = False
            self._stand_down = asyncio.get_running_loop().create_task(
                self.daemon.async_stand_down(), name="cluster-stand-down"
            )
