"""``moldd --config FILE``: the daemon. Start-up order: log → sealed snapshot → verify the chain from the newest
checkpoint or snapshot (refuse to start on a mismatch, exit 3) → projection (snapshot + tail) → hosts (connect
and resync) → recover VMs left mid-command → HA, sweeper, checkpoints → API socket → READY=1 to systemd."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gc
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import structlog

from events import LogIntegrityError, NewEvent, SQLiteEventStore
from moldd import systemd
from moldd.app import groups, hostops, lifecycle, queries  # noqa: F401  (register verbs)
from moldd.app.bus import SYSTEM
from moldd.app.hosts import HostManager
from moldd.app.projector import Projector, release_freed_memory
from moldd.app.service import App
from moldd.config import Config, ConfigError, check_environment, load_config
from moldd.domain.errors import InternalError
from moldd.domain.states import TRANSIENT
from moldd.integrity import (
    EXIT_LOG_TAMPERED,
    KeyFileError,
    Verified,
    async_verify_at_start,
    async_verify_before_signing,
    check_key_file,
    prepare_database_dir,
)
from moldd.libvirt.bridge import LibvirtBridge
from moldd.logging import configure_logging
from moldd.observe.metrics import Metrics

log = structlog.get_logger("moldd")
GIL_SWITCH_INTERVAL_S = 0.001
"""The daemon's ``sys.setswitchinterval`` once ready (see ``Daemon.async_start``)."""
TASK_STOP_TIMEOUT_S = 10.0
"""How long a stop waits for the daemon's own tasks to end once cancelled (``async_cancel_and_wait``)."""


async def async_cancel_and_wait(tasks: list[asyncio.Task[Any]], timeout_s: float = TASK_STOP_TIMEOUT_S) -> None:
    """Cancel ``tasks`` and wait for them to end. A task still running half a second later is cancelled again (a
    cancellation can be lost: Python 3.11's ``asyncio.wait_for`` drops one that comes as its inner wait completes,
    and a loop around it then goes on); after ``timeout_s`` the stop goes on without it, naming it in the log, so
    a stop is never held up for ever by one task."""
    for task in tasks:
        task.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = {task for task in tasks if not task.done()}
    while pending:
        left = deadline - loop.time()
        if left <= 0:
            log.error("tasks_did_not_stop", tasks=sorted(task.get_name() for task in pending), timeout_s=timeout_s)
            break
        _, pending = await asyncio.wait(pending, timeout=min(0.5, left))
        for task in pending:
            log.warning("task_cancelled_again", task=task.get_name())
            task.cancel()
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a task that failed has logged its own error


def _fix_malloc_thresholds() -> None:
    """glibc raises its mmap threshold each time a big block is freed (up to 32 MiB), so the next big replies
    (a list of every VM is megabytes) come from the heap, whose freed memory mostly stays in the process. Fixed
    thresholds keep blocks over 256 KiB in their own mappings, given back when freed. (No glibc: nothing.)"""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1024 * 1024)  # M_TRIM_THRESHOLD: the heap's free top beyond 1 MiB goes back
    except (OSError, AttributeError):
        pass


def log_location(config: Config) -> str:
    """The log as the operator knows it: its file, or its PostgreSQL DSN without a password."""
    dsn = config.database_dsn
    if dsn is None:
        return str(config.database)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[-1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    return urlunsplit(parts) + f" (schema {config.cluster.schema})"


def _load_optional_verbs() -> None:
    """Verb modules that are built on top of the lifecycle; imported for their registration side effect."""
    import importlib

    for name in (
        "moldd.app.operations", "moldd.app.snapshots", "moldd.app.catalog", "moldd.app.users",
        "moldd.app.cluster_queries",
    ):  # fmt: skip
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
        self.cloudstack_tcp: Any = None
        self.ha: Any = None
        self.tasks: list[asyncio.Task[Any]] = []
        self.verified: Verified | None = None
        self.integrity_error: str | None = None
        self.metrics = Metrics()
        self.acting_tasks: list[asyncio.Task[Any]] = []  # the sweepers of a node that acts on the hosts
        self.cluster: Any = None  # moldd.cluster.ClusterRole with daemon.database = "postgresql://..."
        self.sync_timeout = 15.0

    async def async_start(self, *, sync_timeout: float = 15.0) -> None:
        """Start everything; if any step fails, stop what was started (the store included) and re-raise."""
        try:
            await self._async_start(sync_timeout)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.async_stop()
            raise

    async def _async_start(self, sync_timeout: float) -> None:
        _load_optional_verbs()
        _fix_malloc_thresholds()
        cfg = self.config
        # Everything the config refers to is checked before anything (database, directories, socket) is made.
        self.sync_timeout = sync_timeout
        gid = await asyncio.to_thread(check_environment, cfg)
        if cfg.checkpoints.key is not None:
            check_key_file(cfg.checkpoints.key)
        cfg.storage_dir.mkdir(parents=True, exist_ok=True)
        seal_key = None
        if cfg.checkpoints.key is not None:
            from events.checkpoint import load_private_key

            seal_key = await asyncio.to_thread(load_private_key, cfg.checkpoints.key)
        if cfg.database_dsn is not None:
            # the log on PostgreSQL, shared by the cluster's nodes (moldd.cluster)
            from events.postgres import PostgresEventStore
            from moldd.cluster import node_name

            self.store = await PostgresEventStore.async_open(
                cfg.database_dsn, schema=cfg.cluster.schema, application_name=f"moldd:{node_name(cfg)}"
            )
        else:
            prepare_database_dir(cfg.database)
            self.store = await SQLiteEventStore.async_open(cfg.database)
        self.projector = Projector(self.store, snapshot_every=cfg.snapshot_every, seal_key=seal_key)
        snapshot_position = await self.projector.async_load_snapshot()
        # A log file is verified (on a thread, the C scan without the GIL) while the tail is folded into the read
        # model: nothing acts on the model before both are done, and a log that does not verify refuses the start
        # with its own error whatever the fold made of it. (A PostgreSQL log is verified first: both would share
        # the store's connection.)
        restore: asyncio.Future[None] | None = None
        if cfg.database_dsn is None:
            restore = asyncio.ensure_future(self.projector.async_restore())
        try:
            self.verified = await async_verify_at_start(self.store, cfg.database, snapshot_position, cfg)
        except BaseException as exc:
            if restore is not None:
                restore.cancel()
                await asyncio.wait({restore})
                if not restore.cancelled():
                    restore.exception()  # what the fold made of rows that do not verify: not the error to raise
            if isinstance(exc, LogIntegrityError):
                self.integrity_error = exc.message
            raise
        await (restore if restore is not None else self.projector.async_restore())
        self.projector.add_listener(_log_event)
        self.projector.add_listener(self.metrics.on_event)
        self.projector.start(snapshot_tail=False)  # (snapshot_tail() once ready, below)
        self.app = App(cfg, self.store, self.projector, self.hosts)
        self.app.health_checks["hosts_ingest"] = lambda: self.hosts.running or (
            self.cluster is not None and not self.cluster.acting
        )
        self.app.health_checks["log_integrity"] = lambda: self.integrity_error is None
        self.app.on_command = self.metrics.observe_command
        self.metrics.bind(self.app, self.store)
        self.hosts.attach(self.app)
        if cfg.database_dsn is None:
            await self.async_act()
        else:  # one of several nodes: act only once elected (moldd.cluster)
            from moldd.cluster import ClusterRole

            self.cluster = ClusterRole(self)
            await self.cluster.async_start()
        if self.serve_api:
            from moldd.api.serve import async_serve
            from moldd.app.users import directory

            # the API secrets are read once, off the loop, before the first signed request needs them
            await asyncio.to_thread(directory(self.app).store.get, "")
            self.api = await async_serve(
                self.app,
                str(cfg.socket),
                mode=cfg.socket_mode,
                group=gid,
                api=cfg.api,
                cloudstack=self._cloudstack_endpoint(tcp=False),
                group_role=cfg.roles.socket_group_role,
                admin_group=cfg.roles.admin_group,
                metrics=self.metrics,
            )
            cs = cfg.cloudstack
            if cs.port is not None:
                from moldd.api.cloudstack import async_serve_tcp

                metrics_handler = None
                if cs.metrics_token_file is not None and self.metrics is not None:
                    from moldd.config import read_token_file
                    from moldd.observe.web import metrics_route

                    token = read_token_file(cfg.path, "cloudstack.metrics_token_file", cs.metrics_token_file)
                    metrics_handler = metrics_route(self.metrics, token)
                self.cloudstack_tcp = await async_serve_tcp(
                    self._cloudstack_endpoint(tcp=True), cs.bind, cs.port, tls_cert=cs.tls_cert,
                    tls_key=cs.tls_key, max_request_bytes=cs.max_request_bytes, limits=cfg.api,
                    metrics_handler=metrics_handler,
                )  # fmt: skip
        role = "" if self.cluster is None else f" as cluster node {self.cluster.node}"
        systemd.notify_ready(
            f"serving {len(cfg.hosts)} hosts{role}, log at position {self.projector.model.position}"
        )
        self.tasks.append(asyncio.create_task(systemd.async_watchdog_loop(self.healthy), name="watchdog"))
        log.info("moldd_ready", socket=str(cfg.socket), position=self.projector.model.position)
        self.projector.snapshot_tail()  # a long tail folded at start: snapshotted now, in the background
        gc.freeze()  # start-up objects (modules, restored read model) leave the collector: shorter full GCs
        # A thread holding the GIL (a background snapshot's encoding, libvirt's event thread) keeps the loop
        # from answering until it yields: at most this long (Python's default is 5 ms, a whole API p99 budget).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        release_freed_memory()  # what the restore decoded and dropped (snapshot JSON, batches of rows)

    async def async_act(self) -> None:
        """Take charge of the hosts (at start, or when elected): record and connect every host, resync it
        (reconciling jobs this process does not run), recover VMs of unreachable hosts, start HA and the
        sweepers."""
        if self.app is None:
            raise InternalError("the daemon's app is not built yet")
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
        if cfg.checkpoints.key is not None:  # in a cluster: the leader signs
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

    def _cloudstack_endpoint(self, *, tcp: bool) -> Any:
        from moldd.api.cloudstack import CloudStackEndpoint, CloudStackSettings
        from moldd.app.users import directory

        if self.app is None:
            raise InternalError("the daemon's app is not built yet")
        cs = self.config.cloudstack
        settings = CloudStackSettings(
            max_request_bytes=cs.max_request_bytes,
            max_expires_ahead_s=cs.signature_max_age_s,
            rate_per_s=cs.rate_per_s,
            rate_burst=cs.rate_burst,
        )
        return CloudStackEndpoint(self.app, directory(self.app), settings, tcp=tcp)

    def _start_ha(self) -> None:
        try:
            from moldd.ha.watcher import HAManager
        except ModuleNotFoundError:
            return
        if self.app is None:
            raise InternalError("the daemon's app is not built yet")
        self.ha = HAManager(self.app)
        self.ha.start()
        self.app.health_checks["ha"] = lambda: self.ha.healthy()

    def healthy(self) -> bool:
        return self.app is not None and bool(self.app.health()["ok"])

    async def _async_register_hosts(self) -> None:
        """Record each configured host (and changes to it) in the log, so replays know the hosts too."""
        if self.app is None:
            raise InternalError("the daemon's app is not built yet")
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
        if self.app is None:
            raise InternalError("the daemon's app is not built yet")
        for vm in list(self.app.model.vms.values()):
            if vm.state in TRANSIENT and vm.host in unreachable and vm.name not in self.app.vm_jobs:
                payload: dict[str, Any] = {
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

    async def async_checkpoint_now(self) -> bool:
        """Verify the rows written since the last verified position, then sign the head. Returns False (and
        never signs again: health turns bad) when the log on disk is not what the writer wrote."""
        from events.checkpoint import load_private_key, sign_and_append

        cfg = self.config.checkpoints
        if cfg.key is None or cfg.file is None or self.verified is None:
            raise InternalError("checkpoints are not configured")
        if self.integrity_error is not None:
            return False
        try:
            self.verified, head = await async_verify_before_signing(self.store, self.config.database, self.verified)
        except LogIntegrityError as exc:
            self.integrity_error = exc.message
            log.error("checkpoint_refused", reason=exc.message, position=exc.position, kind=exc.kind)
            return False
        key = await asyncio.to_thread(load_private_key, cfg.key)
        await asyncio.to_thread(sign_and_append, cfg.file, key, self.store.log_id, head[0], head[1])
        return True

    async def _async_checkpoints(self) -> None:
        cfg = self.config.checkpoints
        while True:
            try:
                await self.async_checkpoint_now()
            except Exception:
                log.exception("checkpoint_failed")
            await asyncio.sleep(cfg.interval_s)

    async def async_stop(self) -> None:
        systemd.notify_stopping()
        if self.cloudstack_tcp is not None:
            await self.cloudstack_tcp.async_close()
        if self.api is not None:
            await self.api.async_close()
        await async_cancel_and_wait([*self.tasks, *self.acting_tasks])
        if self.ha is not None:
            await self.ha.async_stop()
        if self.app is not None:
            await self.app.async_close()  # running jobs finish while this node still leads
        if self.cluster is not None:
            await self.cluster.async_stop()  # steps down: a standby takes over at once
        await self.hosts.async_stop()
        if self.projector is not None:
            # never seal a snapshot of a log that did not verify
            await self.projector.async_stop(snapshot=self.integrity_error is None)
        if self.store is not None:
            await self.store.async_close()
        self.bridge.shutdown()


async def async_main(config: Config) -> int:
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await daemon.async_start()
        await stop.wait()
        log.info("daemon_stopping", signal=received[0] if received else None)
    finally:
        await daemon.async_stop()
    log.info("daemon_stopped", signal=received[0] if received else None)
    return 0


T = TypeVar("T")


def loop_factory(kind: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event-loop factory for ``[daemon] event_loop``: uvloop's, or ``None`` (asyncio's default). libvirt's
    events reach the loop through ``call_soon_threadsafe`` from libvirt's own event thread
    (:mod:`moldd.libvirt.bridge`), which either loop supports."""
    if kind == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run_loop(main: Coroutine[Any, Any, T], kind: str = "uvloop") -> T:
    """``asyncio.run(main)`` on the loop ``kind`` names (see :func:`loop_factory`)."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moldd", description="VM-management daemon for one KVM cluster")
    parser.add_argument("--config", required=True, type=Path, help="TOML configuration file")
    parser.add_argument("--check-config", action="store_true", help="validate the configuration and exit")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        check_environment(config)
    except ConfigError as exc:
        print(f"moldd: bad configuration: {exc.file}: key {exc.key}: {exc.reason}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"{config.path}: ok ({len(config.hosts)} hosts)")
        return 0
    configure_logging(config.log_level)
    try:
        return run_loop(async_main(config), config.event_loop)
    except LogIntegrityError as exc:
        print(
            f"moldd: refusing to start: the log {log_location(config)} does not verify at position {exc.position} "
            f"({exc.kind}): {exc.message}. Nothing was served or signed; examine a copy with "
            f"`moldd-audit verify` and your off-host checkpoints.",
            file=sys.stderr,
        )
        return EXIT_LOG_TAMPERED
    except KeyFileError as exc:
        print(f"moldd: refusing to start: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from moldd.cluster_secrets import SecretsTableMissing

        if not isinstance(exc, SecretsTableMissing):
            raise
        print(f"moldd: refusing to start: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
