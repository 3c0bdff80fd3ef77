"""``moldd --config FILE``: the daemon. Start-up order: log → projection (snapshot + tail) → hosts (connect and
resync) → recover VMs left mid-command → HA, sweeper, checkpoints → API socket → READY=1 to systemd."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import signal
import sys
from pathlib import Path
from typing import Any

import structlog

from events import NewEvent, SQLiteEventStore
from moldd import systemd
from moldd.app import groups, hostops, lifecycle, queries  # noqa: F401  (register verbs)
from moldd.app.bus import SYSTEM
from moldd.app.hosts import HostManager
from moldd.app.projector import Projector
from moldd.app.service import App
from moldd.config import Config, ConfigError, load_config
from moldd.domain.states import TRANSIENT
from moldd.libvirt.bridge import LibvirtBridge
from moldd.logging import configure_logging

log = structlog.get_logger("moldd")


def _load_optional_verbs() -> None:
    """Verb modules that are built on top of the lifecycle; imported for their registration side effect."""
    import importlib

    for name in ("moldd.app.operations", "moldd.app.snapshots", "moldd.app.cluster_queries"):
        with contextlib.suppress(ModuleNotFoundError):
            importlib.import_module(name)


def _log_event(ev: Any, model: Any) -> None:
    """One journal line per log entry, with the fields an operator greps for."""
    stream = ev.stream_id
    log.info(
        "log_event",
        position=ev.position,
        event_type=ev.event_type,
        vm=stream[3:] if stream.startswith("vm-") else None,
        host=ev.payload.get("host") if isinstance(ev.payload, dict) else None,
        stream=stream,
        actor=ev.actor,
        command_id=ev.command_id or ev.causation_id,
        job=ev.correlation_id,
    )


class Daemon:
    """The whole daemon as one object, so tests run exactly what production runs."""

    def __init__(self, config: Config, *, serve_api: bool = True) -> None:
        self.config = config
        self.serve_api = serve_api
        self.store: Any = None
        self.bridge = LibvirtBridge()
        self.hosts = HostManager(config, self.bridge)
        self.projector: Projector | None = None
        self.app: App | None = None
        self.api: Any = None
        self.ha: Any = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.acting_tasks: list[asyncio.Task[Any]] = []  # the sweepers of a node that acts on the hosts
        self.cluster: Any = None  # moldd.cluster.ClusterRole with daemon.database = "postgresql://..."
        self.sync_timeout = 15.0

    async def async_start(self, *, sync_timeout: float = 15.0) -> None:
        _load_optional_verbs()
        cfg = self.config
        self.sync_timeout = sync_timeout
        cfg.storage_dir.mkdir(parents=True, exist_ok=True)
        if cfg.database_dsn is not None:
            from events.postgres import PostgresEventStore

            self.store = await PostgresEventStore.async_open(
                cfg.database_dsn, schema=cfg.cluster.schema, application_name=f"moldd:{cfg.cluster.node}"
            )
        else:
            cfg.database.parent.mkdir(parents=True, exist_ok=True)
            self.store = await SQLiteEventStore.async_open(cfg.database)
        self.projector = Projector(self.store, snapshot_every=cfg.snapshot_every)
        await self.projector.async_restore()
        self.projector.listeners.append(_log_event)
        self.projector.start()
        self.app = App(cfg, self.store, self.projector, self.hosts)
        self.app.health_checks["hosts_ingest"] = lambda: self.hosts.running or (
            self.cluster is not None and not self.cluster.acting
        )
        self.hosts.attach(self.app)
        if cfg.database_dsn is None:
            await self.async_act()
        else:  # one of several nodes: act only once elected (moldd.cluster)
            from moldd.cluster import ClusterRole

            self.cluster = ClusterRole(self)
            await self.cluster.async_start()
        if self.serve_api:
            from moldd.api.serve import async_serve

            self.api = await async_serve(
                self.app, str(cfg.socket), mode=cfg.socket_mode, group=cfg.socket_group
            )
        role = "" if self.cluster is None else f" as cluster node {cfg.cluster.node}"
        systemd.notify_ready(
            f"serving {len(cfg.hosts)} hosts{role}, log at position {self.projector.model.position}"
        )
        self.tasks.append(asyncio.create_task(systemd.async_watchdog_loop(self.healthy), name="watchdog"))
        log.info("moldd_ready", socket=str(cfg.socket), position=self.projector.model.position)
        gc.freeze()  # start-up objects (modules, restored read model) leave the collector: shorter full GCs

    async def async_act(self) -> None:
        """Take charge of the hosts (at start, or when elected): record and connect every host, resync it
        (reconciling jobs this process does not run), recover VMs of unreachable hosts, start HA and the
        sweepers."""
        assert self.app is not None
        cfg = self.config
        await self._async_register_hosts()
        await self.hosts.async_start()
        unsynced = await self.hosts.async_wait_synced(self.sync_timeout)
        if unsynced:
            log.warning("hosts_not_synced", hosts=unsynced)
        await self._async_recover_unreachable(set(unsynced))
        self._start_ha()
        self.acting_tasks.append(
            asyncio.create_task(
                lifecycle.async_sweep_expunged(self.app, cfg.expunge_sweep_s), name="expunge-sweeper"
            )
        )
        if cfg.checkpoints.key is not None:
            self.acting_tasks.append(asyncio.create_task(self._async_checkpoints(), name="checkpoints"))

    async def async_stand_down(self) -> None:
        """A deposed leader stops acting: sweepers and HA stop, running jobs are abandoned (the next leader
        reconciles them), host connections close. The libvirt bridge already refuses calls (its gate)."""
        tasks, self.acting_tasks = self.acting_tasks, []
        for task in tasks:
            task.cancel()
        ha, self.ha = self.ha, None
        if self.app is not None:
            self.app.health_checks.pop("ha", None)
            for task in list(self.app.jobs.values()):
                task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if ha is not None:
            await ha.async_stop()
        if self.app is not None:
            for task in list(self.app.jobs.values()):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        await self.hosts.async_stop()

    def _start_ha(self) -> None:
        try:
            from moldd.ha.watcher import HAManager
        except ModuleNotFoundError:
            return
        assert self.app is not None
        self.ha = HAManager(self.app)
        self.ha.start()
        self.app.health_checks["ha"] = lambda: self.ha.healthy()

    def healthy(self) -> bool:
        return self.app is not None and bool(self.app.health()["ok"])

    async def _async_register_hosts(self) -> None:
        """Record each configured host (and changes to it) in the log, so replays know the hosts too."""
        assert self.app is not None
        for h in self.config.hosts:
            known = self.app.model.hosts.get(h.name)
            desc = {"name": h.name, "uri": h.uri, "cluster": h.cluster, "max_vms": h.max_vms}
            if known is None or (known.uri, known.cluster, known.max_vms) != (h.uri, h.cluster, h.max_vms):
                await self.app.async_append(
                    f"host-{h.name}", [NewEvent("host.registered", desc, actor="system")]
                )

    async def _async_recover_unreachable(self, unreachable: set[str]) -> None:
        """A VM left mid-command on a host we cannot reach is not left Starting/Stopping forever: it is Unknown
        until its host answers (HA and resync take it from there)."""
        assert self.app is not None
        for vm in list(self.app.model.vms.values()):
            if vm.state in TRANSIENT and vm.host in unreachable and vm.name not in self.app.vm_jobs:
                payload = {
                    "state": "Unknown",
                    "power_state": "unknown",
                    "host": vm.host,
                    "domain_state": None,
                    "reason": f"interrupted while {vm.state} and host {vm.host} is unreachable",
                    "was": vm.state,
                }
                if vm.job:
                    payload |= {
                        "job_status": "failed",
                        "error": {"code": "interrupted", "message": payload["reason"]},
                    }
                await self.app.async_append(
                    f"vm-{vm.name}",
                    [NewEvent("vm.reconciled", payload, actor=str(SYSTEM), correlation_id=vm.job)],
                )

    async def _async_checkpoints(self) -> None:
        from events.checkpoint import async_checkpoint_store

        cfg = self.config.checkpoints
        assert cfg.key is not None and cfg.file is not None
        while True:
            try:
                await async_checkpoint_store(self.store, cfg.key, cfg.file)
            except Exception:
                log.exception("checkpoint_failed")
            await asyncio.sleep(cfg.interval_s)

    async def async_stop(self) -> None:
        systemd.notify_stopping()
        if self.api is not None:
            await self.api.async_close()
        for task in [*self.tasks, *self.acting_tasks]:
            task.cancel()
        for task in [*self.tasks, *self.acting_tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.ha is not None:
            await self.ha.async_stop()
        if self.app is not None:
            await self.app.async_close()  # running jobs finish while this node still leads
        if self.cluster is not None:
            await self.cluster.async_stop()  # steps down: a standby takes over at once
        await self.hosts.async_stop()
        if self.projector is not None:
            await self.projector.async_stop()
        if self.store is not None:
            await self.store.async_close()
        self.bridge.shutdown()


async def async_main(config: Config) -> int:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await daemon.async_start()
        await stop.wait()
    finally:
        await daemon.async_stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moldd", description="VM-management daemon for one KVM cluster")
    parser.add_argument("--config", required=True, type=Path, help="TOML configuration file")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"moldd: bad configuration: {exc.file}: key {exc.key}: {exc.reason}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{config.path}: ok ({len(config.hosts)} hosts)")
        return 0
    configure_logging(config.log_level)
    return asyncio.run(async_main(config))


if __name__ == "__main__":
    sys.exit(main())
