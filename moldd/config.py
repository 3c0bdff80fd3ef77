"""The daemon's TOML configuration. A bad file is refused at start with the file, the key and the reason."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moldd.domain.names import is_rfc1123_label


class ConfigError(Exception):
    def __init__(self, file: Path | str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = str(file)
        self.key = key
        self.reason = reason


@dataclass(frozen=True)
class HostConfig:
    name: str
    uri: str
    cluster: str = "default"
    max_vms: int = 10
    migration_uri: str | None = None  # where a live migration's memory stream goes (tcp://addr:port)
    fence_command: tuple[str, ...] | None = None  # overrides [ha].fence_command for this host


@dataclass(frozen=True)
class OfferingConfig:
    name: str
    vcpus: int
    memory_mib: int
    dynamic: bool = False  # dynamically scalable: hot scale-up up to the maxima below
    max_vcpus: int | None = None
    max_memory_mib: int | None = None


@dataclass(frozen=True)
class TemplateConfig:
    name: str
    image: Path
    os_type: str = "Linux"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class IsoConfig:
    name: str
    path: Path
    os_type: str = "Other"


@dataclass(frozen=True)
class HAConfig:
    enabled: bool = True
    default_policy: str = "always"
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 60.0
    max_restarts: int = 5
    window_s: float = 600.0
    host_down_after_s: float = 3.0  # a host that stays unreachable this long after the link broke is Down
    fence_command: tuple[str, ...] | None = None  # argv; {host} {uri} {cluster} are substituted
    fence_timeout_s: float = 30.0
    keepalive_interval_s: int = 1
    keepalive_count: int = 3


@dataclass(frozen=True)
class CheckpointConfig:
    key: Path | None = None
    file: Path | None = None
    interval_s: float = 300.0


@dataclass(frozen=True)
class ClusterConfig:
    """[cluster]: two or more moldd on one PostgreSQL log (only with daemon.database = "postgresql://...")."""

    node: str = ""  # this node's name in the log and in `moldctl cluster status` (default: the host name)
    schema: str = "events"  # the PostgreSQL schema that holds the log
    lease_s: float = 5.0  # PostgreSQL ends a silent leader's session after this: a standby takes over
    heartbeat_s: float = 1.0  # the leader pings PostgreSQL this often
    fence_after_s: float = 3.0  # a leader without an answer for this long stops acting (< lease_s)


@dataclass(frozen=True)
class Config:
    path: Path
    socket: Path
    database: Path
    storage_dir: Path
    socket_mode: int = 0o660
    socket_group: str | None = None
    hosts: tuple[HostConfig, ...] = ()
    offerings: tuple[OfferingConfig, ...] = ()
    templates: tuple[TemplateConfig, ...] = ()
    isos: tuple[IsoConfig, ...] = ()
    ha: HAConfig = field(default_factory=HAConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    log_level: str = "info"
    stop_timeout_s: float = 60.0
    expunge_delay_s: float = 86400.0
    expunge_sweep_s: float = 60.0
    snapshot_every: int = 1000
    internal_name_pattern: str = "i-{account}-{id}-{instance}"
    append_display_name: bool = False
    account: str = "2"
    instance_suffix: str = "VM"
    domain_type: str = "qemu"
    max_vm_snapshots: int = 10
    tolerated_host_failures: int = 1
    capacity_warning_headroom: int = 1
    database_dsn: str | None = None  # daemon.database = "postgresql://...": the log on PostgreSQL
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def host(self, name: str) -> HostConfig | None:
        return next((h for h in self.hosts if h.name == name), None)

    def offering(self, name: str) -> OfferingConfig | None:
        return next((o for o in self.offerings if o.name == name), None)

    def template(self, name: str) -> TemplateConfig | None:
        return next((t for t in self.templates if t.name == name), None)

    def iso(self, name: str) -> IsoConfig | None:
        return next((i for i in self.isos if i.name == name), None)


class _Reader:
    """Typed access to one TOML table, naming the dotted key on every error."""

    def __init__(self, file: Path, table: dict[str, Any], prefix: str, known: set[str]) -> None:
        self.file, self.table, self.prefix = file, table, prefix
        for key in table:
            if key not in known:
                raise ConfigError(file, self._k(key), f"unknown key (known: {', '.join(sorted(known))})")

    def _k(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False
    ) -> Any:
        if key not in self.table:
            if required or default is ...:
                raise ConfigError(self.file, self._k(key), "is required")
            return default
        value = self.table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool and kind != (bool,):
            raise ConfigError(self.file, self._k(key), f"must be {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(
                self.file, self._k(key), f"must be {_kind_name(kind)}, got {type(value).__name__}"
            )
        return value

    def positive(self, key: str, kind: type, default: Any) -> Any:
        value = self.get(key, kind, default)
        if value <= 0:
            raise ConfigError(self.file, self._k(key), f"must be greater than 0, got {value}")
        return value

    def path(self, key: str, default: Any = ...) -> Path | None:
        value = self.get(key, str, default)
        if value is None:
            return None
        path = Path(value)
        return path if path.is_absolute() else (self.file.parent / path).resolve()

    def argv(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key, list, None)
        if value is None:
            return None
        if not value or not all(isinstance(a, str) for a in value):
            raise ConfigError(self.file, self._k(key), "must be a non-empty list of strings (an argv)")
        return tuple(value)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _table(file: Path, doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(file, key, "must be a table")
    return value


def _tables(file: Path, doc: dict[str, Any], key: str) -> list[tuple[str, dict[str, Any]]]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(file, key, f"must be an array of tables ([[{key}]])")
    return [(f"{key}[{i}]", v) for i, v in enumerate(value)]


def _unique(file: Path, key: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name in seen:
            raise ConfigError(file, f"{key}[{i}].name", f"duplicate name {name!r}")
        seen.add(name)


def load_config(path: Path | str) -> Config:
    file = Path(path).resolve()
    try:
        doc = tomllib.loads(file.read_text())
    except FileNotFoundError:
        raise ConfigError(file, "-", "file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "-", f"not valid TOML: {exc}") from None
    return parse_config(doc, file)


def parse_config(doc: dict[str, Any], file: Path) -> Config:
    known_top = {"daemon", "ha", "checkpoints", "hosts", "offerings", "templates", "isos", "cluster"}
    for key in doc:
        if key not in known_top:
            raise ConfigError(file, key, f"unknown section (known: {', '.join(sorted(known_top))})")
    d = _Reader(
        file,
        _table(file, doc, "daemon"),
        "daemon",
        {
            "socket", "socket_mode", "socket_group", "database", "storage_dir", "log_level", "stop_timeout_s",
            "expunge_delay_s", "expunge_sweep_s", "snapshot_every", "internal_name_pattern", "append_display_name", "account",
            "instance_suffix", "domain_type", "max_vm_snapshots", "tolerated_host_failures",
            "capacity_warning_headroom",
        },
    )  # fmt: skip
    mode_text = d.get("socket_mode", str, "0660")
    try:
        mode = int(mode_text, 8)
    except ValueError:
        raise ConfigError(
            file, "daemon.socket_mode", f"must be an octal string like '0660', got {mode_text!r}"
        ) from None
    pattern = d.get("internal_name_pattern", str, "i-{account}-{id}-{instance}")
    try:
        pattern.format(account="a", id=1, instance="b")
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            file, "daemon.internal_name_pattern", f"may use {{account}} {{id}} {{instance}}: {exc}"
        ) from None
    domain_type = d.get("domain_type", str, "qemu")
    if domain_type not in ("qemu", "kvm"):
        raise ConfigError(file, "daemon.domain_type", "must be 'qemu' (TCG) or 'kvm'")
    level = d.get("log_level", str, "info")
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(file, "daemon.log_level", "must be debug, info, warning or error")

    h = _Reader(
        file,
        _table(file, doc, "ha"),
        "ha",
        {f for f in HAConfig.__dataclass_fields__},
    )
    policy = h.get("default_policy", str, "always")
    if policy not in ("always", "on-failure"):
        raise ConfigError(file, "ha.default_policy", "must be 'always' or 'on-failure'")
    ha = HAConfig(
        enabled=h.get("enabled", bool, True),
        default_policy=policy,
        backoff_base_s=h.positive("backoff_base_s", float, 1.0),
        backoff_cap_s=h.positive("backoff_cap_s", float, 60.0),
        max_restarts=h.positive("max_restarts", int, 5),
        window_s=h.positive("window_s", float, 600.0),
        host_down_after_s=h.positive("host_down_after_s", float, 3.0),
        fence_command=h.argv("fence_command"),
        fence_timeout_s=h.positive("fence_timeout_s", float, 30.0),
        keepalive_interval_s=h.positive("keepalive_interval_s", int, 1),
        keepalive_count=h.positive("keepalive_count", int, 3),
    )
    c = _Reader(file, _table(file, doc, "checkpoints"), "checkpoints", {"key", "file", "interval_s"})
    checkpoints = CheckpointConfig(
        key=c.path("key", None), file=c.path("file", None), interval_s=c.positive("interval_s", float, 300.0)
    )
    if (checkpoints.key is None) != (checkpoints.file is None):
        raise ConfigError(file, "checkpoints", "set both key and file, or neither")

    hosts = []
    for key, table in _tables(file, doc, "hosts"):
        r = _Reader(file, table, key, {"name", "uri", "cluster", "max_vms", "migration_uri", "fence_command"})
        name = r.get("name", str, required=True)
        if not is_rfc1123_label(name):
            raise ConfigError(file, f"{key}.name", f"{name!r} must be a lower-case DNS label (RFC 1123)")
        hosts.append(
            HostConfig(
                name=name,
                uri=r.get("uri", str, required=True),
                cluster=r.get("cluster", str, "default"),
                max_vms=r.positive("max_vms", int, 10),
                migration_uri=r.get("migration_uri", str, None),
                fence_command=r.argv("fence_command"),
            )
        )
    if not hosts:
        raise ConfigError(file, "hosts", "at least one [[hosts]] entry is required")
    _unique(file, "hosts", [h.name for h in hosts])

    offerings = []
    for key, table in _tables(file, doc, "offerings"):
        r = _Reader(
            file, table, key, {"name", "vcpus", "memory_mib", "dynamic", "max_vcpus", "max_memory_mib"}
        )
        o = OfferingConfig(
            name=r.get("name", str, required=True),
            vcpus=r.positive("vcpus", int, 1),
            memory_mib=r.positive("memory_mib", int, 128),
            dynamic=r.get("dynamic", bool, False),
            max_vcpus=r.get("max_vcpus", int, None),
            max_memory_mib=r.get("max_memory_mib", int, None),
        )
        if o.max_vcpus is not None and o.max_vcpus < o.vcpus:
            raise ConfigError(file, f"{key}.max_vcpus", "must be at least vcpus")
        if o.max_memory_mib is not None and o.max_memory_mib < o.memory_mib:
            raise ConfigError(file, f"{key}.max_memory_mib", "must be at least memory_mib")
        offerings.append(o)
    _unique(file, "offerings", [o.name for o in offerings])

    templates = []
    for key, table in _tables(file, doc, "templates"):
        r = _Reader(file, table, key, {"name", "image", "os_type", "kernel", "initrd", "cmdline"})
        templates.append(
            TemplateConfig(
                name=r.get("name", str, required=True),
                image=r.path("image") or Path(),
                os_type=r.get("os_type", str, "Linux"),
                kernel=r.path("kernel", None),
                initrd=r.path("initrd", None),
                cmdline=r.get("cmdline", str, None),
            )
        )
    _unique(file, "templates", [t.name for t in templates])
    isos = []
    for key, table in _tables(file, doc, "isos"):
        r = _Reader(file, table, key, {"name", "path", "os_type"})
        isos.append(
            IsoConfig(
                name=r.get("name", str, required=True),
                path=r.path("path") or Path(),
                os_type=r.get("os_type", str, "Other"),
            )
        )
    _unique(file, "isos", [i.name for i in isos])

    database_dsn, cluster = _cluster(file, doc, d)
    return Config(
        path=file,
        socket=d.path("socket", "/run/moldd/moldd.sock") or Path(),
        database=Path() if database_dsn else d.path("database", "/var/lib/moldd/log.db") or Path(),
        database_dsn=database_dsn,
        cluster=cluster,
        storage_dir=d.path("storage_dir", "/var/lib/moldd/disks") or Path(),
        socket_mode=mode,
        socket_group=d.get("socket_group", str, None),
        hosts=tuple(hosts),
        offerings=tuple(offerings),
        templates=tuple(templates),
        isos=tuple(isos),
        ha=ha,
        checkpoints=checkpoints,
        log_level=level,
        stop_timeout_s=d.positive("stop_timeout_s", float, 60.0),
        expunge_delay_s=d.get("expunge_delay_s", float, 86400.0),
        expunge_sweep_s=d.positive("expunge_sweep_s", float, 60.0),
        snapshot_every=d.positive("snapshot_every", int, 1000),
        internal_name_pattern=pattern,
        append_display_name=d.get("append_display_name", bool, False),
        account=d.get("account", str, "2"),
        instance_suffix=d.get("instance_suffix", str, "VM"),
        domain_type=domain_type,
        max_vm_snapshots=d.positive("max_vm_snapshots", int, 10),
        tolerated_host_failures=d.get("tolerated_host_failures", int, 1),
        capacity_warning_headroom=d.get("capacity_warning_headroom", int, 1),
    )


def _cluster(file: Path, doc: dict[str, Any], d: _Reader) -> tuple[str | None, ClusterConfig]:
    """daemon.database as a PostgreSQL DSN, and the [cluster] section (leader election timings)."""
    import socket

    from events.leader import Timings

    raw = d.get("database", str, "")
    dsn = raw if raw.startswith(("postgresql://", "postgres://")) else None
    c = _Reader(file, _table(file, doc, "cluster"), "cluster", {"node", "schema", "lease_s", "heartbeat_s", "fence_after_s"})
    if doc.get("cluster") and dsn is None:
        raise ConfigError(file, "cluster", 'needs daemon.database = "postgresql://..." (the shared log)')
    cluster = ClusterConfig(
        node=c.get("node", str, "") or socket.gethostname(),
        schema=c.get("schema", str, "events"),
        lease_s=c.positive("lease_s", float, 5.0),
        heartbeat_s=c.positive("heartbeat_s", float, 1.0),
        fence_after_s=c.positive("fence_after_s", float, 3.0),
    )
    try:
        Timings(cluster.lease_s, cluster.heartbeat_s, cluster.fence_after_s)
    except ValueError as exc:
        raise ConfigError(file, "cluster", str(exc)) from None
    if not cluster.node.isprintable() or len(cluster.node) > 63:
        raise ConfigError(file, "cluster.node", "must be printable and at most 63 characters")
    return dsn, cluster
