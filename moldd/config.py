"""The daemon's TOML configuration, declared once: one pydantic schema per section.

Each key's type, default, range and documentation are stated here and nowhere else; the README's
configuration reference is generated from these schemas (``python -m moldd.config --markdown``, kept in
sync by ``tests/daemon/test_config.py``). A bad file is refused with the file, the dotted key and the reason
(``ConfigError``), and :func:`check_environment` checks what the configuration refers to on this machine
(directories, files, the socket group) before the daemon creates anything.

Adding a section: declare a ``Section`` subclass and add one field to :class:`Config` (its name is the
TOML table, ``[name]`` or ``[[name]]`` for a tuple of sections).
"""

from __future__ import annotations

import grp
import math
import os
import re
import stat
import string
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic import model_validator as _model_validator

from moldd.domain.names import is_rfc1123_label


class ConfigError(Exception):
    def __init__(self, file: Path | str, key: str, reason: str) -> None:
        super().__init__(f"{file}: {key}: {reason}")
        self.file = str(file)
        self.key = key
        self.reason = reason


class Section(BaseModel):
    """A TOML table: unknown keys, wrong types (no silent coercion), NaN and infinities are refused."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, validate_default=True
    )


# Field helpers: a path is resolved against the configuration file's directory; an argv is a non-empty list.
def _path(default: Any, doc: str) -> Any:
    return Field(default, strict=False, description=doc)


def _argv_field(doc: str) -> Any:
    return Field(None, strict=False, min_length=1, description=doc)


def _resolve(cls: Any, value: Path | None, info: ValidationInfo) -> Path | None:
    if value is None:
        return None
    if not str(value).strip() or "\0" in str(value):
        raise ValueError("must be a non-empty path")
    base = (info.context or {}).get("base")
    if value.is_absolute() or base is None:
        return value
    return (Path(base) / value).resolve()


def _no_controls(value: str | None) -> str | None:
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


_FENCE_FIELDS = ("host", "uri", "cluster")


def _check_argv(value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """An argv whose ``{placeholders}`` are the ones fencing substitutes (checked now, not at fencing time)."""
    if value is None:
        return None
    for i, part in enumerate(value):
        _no_controls(part)
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(part) if f is not None]
        except ValueError as exc:
            raise ValueError(f"argument {i} ({part!r}): {exc}") from None
        for name in names:
            if name not in _FENCE_FIELDS:
                raise ValueError(
                    f"argument {i} ({part!r}) uses {{{name}}}; the placeholders are "
                    + " ".join(f"{{{f}}}" for f in _FENCE_FIELDS)
                )
        part.format(**dict.fromkeys(_FENCE_FIELDS, "x"))
    return value


def _argv_validator(cls: Any, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
    return _check_argv(value)


def _controls_validator(cls: Any, value: str | None) -> str | None:
    return _no_controls(value)


_LIBVIRT_DRIVERS = {
    "qemu", "test", "xen", "lxc", "libxl", "vbox", "vmwareplayer", "vmwarews", "vmwarefusion", "esx", "gsx",
    "vpx", "hyperv", "bhyve", "ch", "openvz", "vz", "parallels", "remote", "xenapi",
}  # fmt: skip
_LIBVIRT_TRANSPORTS = {"ssh", "tcp", "tls", "unix", "ext", "libssh", "libssh2"}


def _check_libvirt_uri(uri: str) -> str:
    if not uri or any(c.isspace() or ord(c) < 32 for c in uri) or "://" not in uri:
        raise ValueError(f"{uri!r} is not a libvirt URI like 'qemu+ssh://root@kvm1/system'")
    scheme = uri.split("://", 1)[0]
    driver, _, transport = scheme.partition("+")
    if driver not in _LIBVIRT_DRIVERS:
        raise ValueError(f"{uri!r}: unknown libvirt driver {driver!r} (e.g. qemu, test)")
    if transport and transport not in _LIBVIRT_TRANSPORTS:
        raise ValueError(
            f"{uri!r}: unknown transport {transport!r} (one of {', '.join(sorted(_LIBVIRT_TRANSPORTS))})"
        )
    try:
        urlsplit(uri).port  # noqa: B018  (a bad port raises)
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    return uri


class DaemonConfig(Section):
    """``[daemon]``: the socket, the database and the daemon-wide rules."""

    socket: Path = _path(Path("/run/moldd/moldd.sock"), "the API's Unix socket; its directory must exist")
    socket_mode: int = Field(
        0o660,
        validate_default=False,
        description="octal permission bits of the socket: owner and group only (the API authorises by group)",
        json_schema_extra={"toml_type": "octal string", "toml_default": '"0660"'},
    )
    socket_group: str | None = Field(
        None, description="group (name or gid) whose members may use the socket; root always may"
    )
    database: Path = _path(
        Path("/var/lib/moldd/log.db"),
        'the event log (SQLite; its directory is created), or "postgresql://..." (see [cluster])',
    )
    storage_dir: Path = _path(
        Path("/var/lib/moldd/disks"), "VM disks; must be shared storage for migration / HA across hosts"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="journal verbosity")
    stop_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="graceful (ACPI) stop, then forced after this many seconds"
    )
    expunge_delay_s: float = Field(
        86400.0, ge=0, le=315_360_000, description="a Destroyed VM is expunged by the sweeper after this"
    )
    expunge_sweep_s: float = Field(60.0, gt=0, le=86400, description="how often the expunge sweeper runs")
    snapshot_every: int = Field(
        1000, ge=1, le=10_000_000, description="events between two read-model snapshots"
    )
    internal_name_pattern: str = Field(
        "i-{account}-{id}-{instance}",
        min_length=1,
        max_length=64,
        description="libvirt domain names; placeholders {account} {id} {instance}",
    )
    append_display_name: bool = Field(False, description="the manual's 'add display name to internal name'")
    account: str = Field("2", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="{account} in internal names")
    instance_suffix: str = Field(
        "VM", pattern=r"^[A-Za-z0-9_-]{1,32}$", description="{instance} in internal names"
    )
    domain_type: Literal["qemu", "kvm"] = Field("qemu", description="'qemu' (TCG) or 'kvm'")
    max_vm_snapshots: int = Field(10, ge=1, le=1000, description="VM snapshots kept per VM at most")
    tolerated_host_failures: int = Field(
        1, ge=0, le=1000, description="capacity rule: the VMs must fit on N minus this many hosts"
    )
    capacity_warning_headroom: int = Field(
        1, ge=0, le=100_000, description="warn (cluster.capacity_low) when fewer free VM slots remain"
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="the daemon's event loop: uvloop (faster API) or Python's own asyncio loop"
    )

    resolve_paths = field_validator("socket", "database", "storage_dir")(_resolve)

    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, value: Any) -> int:
        if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
            raise ValueError(f"must be an octal string like '0660', got {value!r}")
        mode = int(value, 8)
        if mode & 0o007:
            raise ValueError(
                f"{value!r} lets every local user connect; use socket_group with a mode like '0660'"
            )
        if mode & 0o600 != 0o600:
            raise ValueError(f"{value!r}: the owner needs read and write (e.g. '0660')")
        if mode & 0o111:
            raise ValueError(f"{value!r}: execute bits mean nothing on a socket (e.g. '0660')")
        return mode

    @field_validator("socket_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?", value):
            raise ValueError(f"{value!r} is not a group name or gid")
        return value

    @field_validator("internal_name_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        _no_controls(value)
        try:
            names = {f for _, f, _, _ in string.Formatter().parse(value) if f is not None}
            unknown = names - {"account", "id", "instance"}
            if unknown:
                raise ValueError(f"unknown placeholder {{{sorted(unknown)[0]}}}")
            value.format(account="a", id=1, instance="b")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"may use {{account}} {{id}} {{instance}}: {exc}") from None
        return value


class HAConfig(Section):
    """``[ha]``: restart policy, host failure detection and fencing."""

    enabled: bool = Field(True, description="restart VMs that stop unexpectedly and evacuate Down hosts")
    default_policy: Literal["always", "on-failure"] = Field(
        "always", description="'always' or 'on-failure' (see HA)"
    )
    backoff_base_s: float = Field(1.0, gt=0, le=3600, description="delay before restart n: base·n² s, capped")
    backoff_cap_s: float = Field(60.0, gt=0, le=86400, description="the restart delay's cap")
    max_restarts: int = Field(5, ge=1, le=1000, description="restarts within window_s; then the VM is Error")
    window_s: float = Field(600.0, gt=0, le=604800, description="the window max_restarts counts in")
    host_down_after_s: float = Field(
        3.0, gt=0, le=3600, description="unreachable this long after the link broke → Down → fence"
    )
    fence_command: tuple[str, ...] | None = _argv_field(
        "argv run to power a Down host off (exit 0 = off beyond doubt); {host} {uri} {cluster} substituted"
    )
    fence_timeout_s: float = Field(30.0, gt=0, le=3600, description="a fence command running longer failed")
    keepalive_interval_s: int = Field(1, ge=1, le=3600, description="libvirt keepalive interval (s)")
    keepalive_count: int = Field(3, ge=1, le=100, description="unanswered keepalives before the link is broken")

    check_argv = field_validator("fence_command")(_argv_validator)

    @_model_validator(mode="after")
    def _cap(self) -> HAConfig:
        if self.backoff_cap_s < self.backoff_base_s:
            raise _KeyedError("backoff_cap_s", "must be at least backoff_base_s")
        return self


class CheckpointConfig(Section):
    """``[checkpoints]``: optional signed checkpoints of the log's head hash (set both key and file, or neither)."""

    key: Path | None = _path(None, "signing key, outside the database (created if missing)")
    file: Path | None = _path(None, "where signed checkpoints are appended; ship it off the host")
    interval_s: float = Field(300.0, gt=0, le=86400, description="how often a checkpoint is signed")

    resolve_paths = field_validator("key", "file")(_resolve)

    @_model_validator(mode="after")
    def _both(self) -> CheckpointConfig:
        if (self.key is None) != (self.file is None):
            raise ValueError("set both key and file, or neither")
        return self


class ApiConfig(Section):
    """``[api]``: limits of the socket API, so a slow or hostile client cannot hold the daemon's resources."""

    header_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="a request's line and headers must arrive within this"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="a request body must arrive within this (after the headers)"
    )
    idle_timeout_s: float = Field(
        75.0, gt=0, le=86400, description="an idle keep-alive connection is closed after this"
    )
    max_connections: int = Field(
        256, ge=1, le=65536, description="concurrent connections; more wait in the backlog (logged)"
    )
    backlog: int = Field(512, ge=1, le=65535, description="listen() backlog (capped by net.core.somaxconn)")
    max_body_bytes: int = Field(1_048_576, ge=1024, le=67_108_864, description="largest request body")
    follower_buffer: int = Field(
        1000, ge=10, le=1_000_000, description="events buffered per /v1/events follower before it is cut"
    )


class CloudStackConfig(Section):
    """``[cloudstack]``: CloudStack's API (``/client/api``). Always on the Unix socket; the TCP listener is off
    unless ``port`` is set, and only answers requests signed with a user's API key."""

    bind: str = Field("127.0.0.1", min_length=1, max_length=255, description="the TCP listener's address")
    port: int | None = Field(None, ge=0, le=65535, description="the TCP listener's port (0: any free port)")
    tls_cert: Path | None = _path(None, "TLS certificate (PEM); TLS 1.2 or newer only")
    tls_key: Path | None = _path(None, "TLS private key (PEM)")
    secrets_file: Path | None = _path(
        None, "API secret keys, mode 0600 (default: api-secrets.json beside the database)"
    )
    signature_max_age_s: float = Field(
        900.0, gt=0, le=86400, description="a signed request's expires may lie at most this far ahead"
    )
    rate_per_s: float = Field(20.0, gt=0, le=1_000_000, description="requests per second per API key")
    rate_burst: int = Field(40, ge=1, le=1_000_000, description="requests at once per API key")
    max_request_bytes: int = Field(65536, ge=1024, le=16_777_216, description="largest query string or form")
    metrics_token_file: Path | None = _path(
        None,
        "file holding the bearer token GET /metrics on the TCP listener asks for (mode 0600 or 0640); "
        "unset: no /metrics on TCP",
    )

    resolve_paths = field_validator("tls_cert", "tls_key", "secrets_file", "metrics_token_file")(_resolve)
    check_controls = field_validator("bind")(_controls_validator)

    @_model_validator(mode="after")
    def _tls(self) -> CloudStackConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise _KeyedError("tls_key", "set both tls_cert and tls_key, or neither")
        loopback = self.bind in ("127.0.0.1", "::1", "localhost")
        if self.port is not None and self.tls_cert is None and not loopback:
            raise _KeyedError(
                "bind",
                f"a listener on {self.bind} needs TLS (tls_cert and tls_key); plain HTTP only on the loopback",
            )
        return self


class RolesConfig(Section):
    """``[roles]``: roles on the Unix socket. Root, the daemon's uid and members of ``admin_group`` are admins;
    the other members of ``[daemon].socket_group`` get ``socket_group_role``."""

    socket_group_role: Literal["admin", "operator", "readonly"] = Field(
        "operator", description="the role of socket-group members"
    )
    admin_group: str | None = Field(None, description="group (name or gid) whose members are admins")

    @field_validator("admin_group")
    @classmethod
    def _group(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?", value):
            raise ValueError(f"{value!r} is not a group name or gid")
        return value


class HostConfig(Section):
    """``[[hosts]]``: one libvirt host (at least one)."""

    name: str = Field(description="a lower-case DNS label (RFC 1123)")
    uri: str = Field(description="libvirt URI, e.g. 'qemu+ssh://root@kvm1/system'")
    cluster: str = Field("default", pattern=r"^[A-Za-z0-9_.-]{1,63}$", description="capacity/HA group")
    max_vms: int = Field(10, ge=1, le=100_000, description="VMs this host may run")
    migration_uri: str | None = Field(
        None, description="where a live migration's memory stream goes, e.g. 'tcp://10.0.0.11'"
    )
    fence_command: tuple[str, ...] | None = _argv_field("overrides [ha].fence_command for this host")

    check_argv = field_validator("fence_command")(_argv_validator)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_rfc1123_label(value):
            raise ValueError(f"{value!r} must be a lower-case DNS label (RFC 1123)")
        return value

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _check_libvirt_uri(value)

    @field_validator("migration_uri")
    @classmethod
    def _migration_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018
        except ValueError as exc:
            raise ValueError(f"{value!r}: {exc}") from None
        if parts.scheme not in ("tcp", "rdma") or not parts.hostname or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not like 'tcp://10.0.0.11' or 'tcp://10.0.0.11:49152'")
        return value


class OfferingConfig(Section):
    """``[[offerings]]``: a service offering (CPU and memory of a VM)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="the offering's name")
    vcpus: int = Field(1, ge=1, le=256, description="virtual CPUs")
    memory_mib: int = Field(128, ge=16, le=16_777_216, description="memory (MiB)")
    dynamic: bool = Field(False, description="dynamically scalable: hot scale-up up to the maxima below")
    max_vcpus: int | None = Field(None, ge=1, le=256, description="hot scale-up limit (default: vcpus)")
    max_memory_mib: int | None = Field(
        None, ge=16, le=16_777_216, description="hot scale-up limit (default: memory_mib)"
    )

    @_model_validator(mode="after")
    def _maxima(self) -> OfferingConfig:
        if self.max_vcpus is not None and self.max_vcpus < self.vcpus:
            raise _KeyedError("max_vcpus", "must be at least vcpus")
        if self.max_memory_mib is not None and self.max_memory_mib < self.memory_mib:
            raise _KeyedError("max_memory_mib", "must be at least memory_mib")
        return self


class TemplateConfig(Section):
    """``[[templates]]``: a disk image VMs are deployed from (files must exist)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="the template's name")
    image: Path = Field(strict=False, description="the qcow2/raw image (a readable file)")
    os_type: str = Field("Linux", min_length=1, max_length=255, description="shown to users")
    kernel: Path | None = _path(None, "direct kernel boot: the kernel (a readable file)")
    initrd: Path | None = _path(None, "direct kernel boot: the initrd (a readable file)")
    cmdline: str | None = Field(None, max_length=4096, description="direct kernel boot: the command line")

    resolve_paths = field_validator("image", "kernel", "initrd")(_resolve)
    check_controls = field_validator("os_type", "cmdline")(_controls_validator)

    @_model_validator(mode="after")
    def _kernel(self) -> TemplateConfig:
        if (self.initrd is not None or self.cmdline is not None) and self.kernel is None:
            raise _KeyedError("kernel", "initrd and cmdline need a kernel")
        return self


class IsoConfig(Section):
    """``[[isos]]``: an ISO image VMs may boot from or attach (the file must exist)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="the ISO's name")
    path: Path = Field(strict=False, description="the ISO file (readable)")
    os_type: str = Field("Other", min_length=1, max_length=255, description="shown to users")

    resolve_paths = field_validator("path")(_resolve)
    check_controls = field_validator("os_type")(_controls_validator)


class _KeyedError(ValueError):
    """A cross-field error that names the key it is about (inside a section)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


class ClusterConfig(Section):
    """``[cluster]``: several moldd on one PostgreSQL log (only with ``daemon.database = "postgresql://..."``)."""

    node: str = Field(
        "", max_length=63, description="this node's name in the log and in `moldctl cluster status` (empty: the host name)"
    )
    schema_name: str = Field(
        "events", alias="schema", min_length=1, max_length=63, description="the PostgreSQL schema holding the log"
    )
    lease_s: float = Field(
        4.0, gt=0, le=3600, description="PostgreSQL ends a silent leader's session after this; a standby takes over"
    )
    heartbeat_s: float = Field(0.5, gt=0, le=3600, description="the leader pings PostgreSQL this often")
    fence_after_s: float = Field(
        2.5, gt=0, le=3600, description="a leader without an answer for this long stops acting (< lease_s)"
    )

    check_node = field_validator("node")(_controls_validator)

    @_model_validator(mode="after")
    def _budget(self) -> ClusterConfig:
        if not self.heartbeat_s < self.fence_after_s:
            raise _KeyedError("heartbeat_s", "must be less than fence_after_s")
        if not self.fence_after_s < self.lease_s:
            raise _KeyedError("fence_after_s", "must be less than lease_s (the leader stops before it can be replaced)")
        return self

    @property
    def schema(self) -> str:  # type: ignore[override]
        return self.schema_name


class Config(DaemonConfig):
    """The whole configuration. The ``[daemon]`` keys are attributes of the config itself (``config.socket``);
    every other field is a section named like its TOML table."""

    path: Path = Field(Path("moldd.toml"), strict=False, exclude=True)
    ha: HAConfig = Field(HAConfig(), strict=False)
    checkpoints: CheckpointConfig = Field(CheckpointConfig(), strict=False)
    api: ApiConfig = Field(ApiConfig(), strict=False)
    cloudstack: CloudStackConfig = Field(CloudStackConfig(), strict=False)
    roles: RolesConfig = Field(RolesConfig(), strict=False)
    cluster: ClusterConfig = Field(ClusterConfig(), strict=False)
    # daemon.database = "postgresql://...": the log on PostgreSQL (then `database` is unused); not a TOML key
    database_dsn: str | None = Field(None, exclude=True)
    hosts: tuple[HostConfig, ...] = Field(strict=False, min_length=1)
    offerings: tuple[OfferingConfig, ...] = Field((), strict=False)
    templates: tuple[TemplateConfig, ...] = Field((), strict=False)
    isos: tuple[IsoConfig, ...] = Field((), strict=False)

    NAMED: ClassVar[tuple[str, ...]] = ("hosts", "offerings", "templates", "isos")

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        """TOML table name → schema, in declaration order (``daemon`` first)."""
        out: dict[str, type[Section]] = {"daemon": DaemonConfig}
        for name, info in cls.model_fields.items():
            if name in DaemonConfig.model_fields or name in ("path", "database_dsn"):
                continue
            out[name] = _section_type(info.annotation)
        return out

    @_model_validator(mode="after")
    def _cluster_needs_postgresql(self) -> Config:
        if "cluster" in self.model_fields_set and self.database_dsn is None:
            raise _KeyedError("cluster", 'needs daemon.database = "postgresql://..." (the shared log)')
        return self

    @_model_validator(mode="after")
    def _unique_names(self) -> Config:
        for table in self.NAMED:
            seen: set[str] = set()
            for i, item in enumerate(getattr(self, table)):
                if item.name in seen:
                    raise _KeyedError(f"{table}[{i}].name", f"duplicate name {item.name!r}")
                seen.add(item.name)
        return self

    def host(self, name: str) -> HostConfig | None:
        return next((h for h in self.hosts if h.name == name), None)

    def offering(self, name: str) -> OfferingConfig | None:
        return next((o for o in self.offerings if o.name == name), None)

    def template(self, name: str) -> TemplateConfig | None:
        return next((t for t in self.templates if t.name == name), None)

    def iso(self, name: str) -> IsoConfig | None:
        return next((i for i in self.isos if i.name == name), None)


def _section_type(annotation: Any) -> type[Section]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (tuple, types.UnionType, typing.Union) and args:
        annotation = args[0]
    if not (isinstance(annotation, type) and issubclass(annotation, Section)):
        raise TypeError(f"not a config section type: {annotation!r}")
    return annotation


def _is_array(name: str) -> bool:
    return typing.get_origin(Config.model_fields[name].annotation) is tuple


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out


def _reason(err: Any) -> str:
    ctx = err.get("ctx") or {}
    inner = ctx.get("error")
    if isinstance(inner, ValueError):
        return str(inner)
    msg = str(err["msg"]).removeprefix("Value error, ")
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "is required"
    if kind == "too_short":
        return "must not be empty"
    if kind == "path_type":
        msg = "must be a path (a string)"
    msg = msg.replace("Input should be", "must be")
    value = err.get("input")
    if kind.endswith("_type") or kind in ("finite_number", "literal_error") or "than" in msg:
        if isinstance(value, (bool, int, float, str)):
            return f"{msg[0].lower()}{msg[1:]}, got {value!r}"
    return msg[0].lower() + msg[1:]


def parse_config(doc: dict[str, Any], file: Path) -> Config:
    """Validate a parsed TOML document; the first problem is raised as ``ConfigError`` (file, key, reason)."""
    _check_shape(doc, file)
    try:
        return Config.model_validate(_model_data(doc, file), context={"base": file.parent})
    except ValidationError as exc:
        raise _config_error(exc, file) from None


def _check_shape(doc: dict[str, Any], file: Path) -> None:
    """The document's outline, before its values: known sections of the right kind (table or array of tables),
    known ``[daemon]`` keys, at least one host."""
    sections = Config.sections()
    for key, value in doc.items():
        if key not in sections:
            raise ConfigError(file, key, f"unknown section (known: {', '.join(sorted(sections))})")
        if _is_array(key) if key != "daemon" else False:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(file, key, f"must be an array of tables ([[{key}]])")
        elif not isinstance(value, dict):
            raise ConfigError(file, key, f"must be a table ([{key}])")
    for key in doc.get("daemon", {}):
        if key not in DaemonConfig.model_fields:
            known = ", ".join(sorted(DaemonConfig.model_fields))
            raise ConfigError(file, f"daemon.{key}", f"unknown key (known: {known})")
    if not doc.get("hosts"):
        raise ConfigError(file, "hosts", "at least one [[hosts]] entry is required")


def _model_data(doc: dict[str, Any], file: Path) -> dict[str, Any]:
    """The document as ``Config``'s fields: ``[daemon]`` keys at the top; a PostgreSQL ``database`` is a DSN."""
    daemon = doc.get("daemon", {})
    data = {**daemon, **{k: v for k, v in doc.items() if k != "daemon"}, "path": file}
    db = daemon.get("database")
    if isinstance(db, str) and db.startswith(("postgresql://", "postgres://")):
        data.pop("database")  # the log on PostgreSQL: `database` keeps its (unused) default
        data["database_dsn"] = db
    return data


def _config_error(exc: ValidationError, file: Path) -> ConfigError:
    """pydantic's first error as the TOML key at fault (``daemon.x``, ``hosts[0].uri``) and a reason."""
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    if loc and loc[0] in DaemonConfig.model_fields:
        loc = ("daemon", *loc)
    inner = (err.get("ctx") or {}).get("error")
    if isinstance(inner, _KeyedError):
        loc = (*loc, *inner.key.replace("[", ".[").split(".")) if loc else (inner.key,)
        loc = tuple(p for p in loc if p != "")
    key = _dotted(loc).replace(".[", "[") or "-"
    if not isinstance(inner, _KeyedError) and err["type"] == "extra_forbidden" and len(loc) > 1:
        model = _model_at(loc[:-1])
        if model is not None:
            return ConfigError(file, key, f"unknown key (known: {', '.join(sorted(model.model_fields))})")
    return ConfigError(file, key, _reason(err))


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    if loc and loc[0] == "daemon":
        return DaemonConfig
    if loc and isinstance(loc[0], str) and loc[0] in Config.model_fields and loc[0] != "path":
        return _section_type(Config.model_fields[loc[0]].annotation)
    return None


def load_config(path: Path | str) -> Config:
    """Read and validate ``path``. Checks the files the config names (templates, ISOs) but creates nothing."""
    file = Path(path).absolute()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(file, "-", "file not found") from None
    except IsADirectoryError:
        raise ConfigError(file, "-", "is a directory, not a file") from None
    except OSError as exc:
        raise ConfigError(file, "-", f"cannot be read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "-", f"not UTF-8 (byte {exc.start})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "-", f"not valid TOML: {exc}") from None
    config = parse_config(doc, file)
    check_files(config)
    return config


def _readable_file(file: Path, key: str, path: Path) -> None:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(file, key, f"{path} does not exist") from None
    except OSError as exc:
        raise ConfigError(file, key, f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(file, key, f"{path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(file, key, f"{path} is not readable by this user")


def check_files(config: Config) -> None:
    """The images the configuration names exist and are readable regular files."""
    for i, t in enumerate(config.templates):
        _readable_file(config.path, f"templates[{i}].image", t.image)
        for key in ("kernel", "initrd"):
            p = getattr(t, key)
            if p is not None:
                _readable_file(config.path, f"templates[{i}].{key}", p)
    for i, iso in enumerate(config.isos):
        _readable_file(config.path, f"isos[{i}].path", iso.path)


def _creatable_dir(file: Path, key: str, path: Path) -> None:
    """``path`` is a writable directory, or could be made one (its nearest existing ancestor is writable)."""
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ConfigError(file, key, f"{probe} is a dangling symbolic link")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(file, key, f"{probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(file, key, f"{probe} is not writable by this user")


def resolve_gid(file: Path, key: str, group: str | None) -> int | None:
    """The gid of ``group`` (a name or a number); an unknown group is a ``ConfigError``."""
    if group is None:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(file, key, f"no such group {group!r}") from None


def read_token_file(file: Path | str, key: str, path: Path) -> str:
    """The secret token in ``path``: a regular file that other users cannot read nor its group write, holding
    one line of at least 16 printable characters."""
    try:
        st = path.stat()
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError) as exc:
        raise ConfigError(file, key, f"cannot read {path}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(file, key, f"{path} is not a regular file")
    if stat.S_IMODE(st.st_mode) & 0o027:
        raise ConfigError(file, key, f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: run chmod 0600 {path}")
    if len(text) < 16 or not text.isprintable() or " " in text:
        raise ConfigError(file, key, f"{path} must hold one token of at least 16 printable characters")
    return text


def check_environment(config: Config) -> int | None:
    """What the configuration refers to on this machine, checked before the daemon creates anything:
    the database and storage can be created or used, the socket's directory exists, the socket group exists.
    Returns the socket group's gid. Blocking (NSS, file system): call it off the event loop."""
    f = config.path
    db = config.database
    if config.database_dsn is not None:
        pass  # the log is on PostgreSQL: nothing to check on this machine
    elif db.is_dir():
        raise ConfigError(f, "daemon.database", f"{db} is a directory; name the database file inside it")
    elif db.exists():
        if not stat.S_ISREG(db.stat().st_mode):
            raise ConfigError(f, "daemon.database", f"{db} is not a regular file")
        if not os.access(db, os.R_OK | os.W_OK):
            raise ConfigError(f, "daemon.database", f"{db} is not readable and writable by this user")
    if config.database_dsn is None:
        _creatable_dir(f, "daemon.database", db.parent)
    if config.storage_dir.exists() and not config.storage_dir.is_dir():
        raise ConfigError(f, "daemon.storage_dir", f"{config.storage_dir} is not a directory")
    _creatable_dir(f, "daemon.storage_dir", config.storage_dir)
    parent = config.socket.parent
    if not parent.is_dir():
        raise ConfigError(
            f, "daemon.socket", f"directory {parent} does not exist (systemd's RuntimeDirectory= makes it)"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f, "daemon.socket", f"directory {parent} is not writable by this user")
    if config.socket.exists() and not stat.S_ISSOCK(config.socket.lstat().st_mode):
        raise ConfigError(f, "daemon.socket", f"{config.socket} exists and is not a socket")
    if config.cloudstack.metrics_token_file is not None:
        read_token_file(f, "cloudstack.metrics_token_file", config.cloudstack.metrics_token_file)
    if config.checkpoints.key is not None and config.checkpoints.file is not None:
        _creatable_dir(f, "checkpoints.key", config.checkpoints.key.parent)
        _creatable_dir(f, "checkpoints.file", config.checkpoints.file.parent)
    return resolve_gid(f, "daemon.socket_group", config.socket_group)


# --- the README's reference, generated from the schemas -------------------------------------------------


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f'`"{a}"`' for a in args)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        return " \\| ".join(_type_name(a) for a in inner) + " (optional)"
    if origin is tuple:
        return "list of strings"
    return {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _toml_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, float):
        return f"`{value:g}`" if math.isfinite(value) else str(value)
    if isinstance(value, (int, Path)):
        return f"`{value}`" if isinstance(value, int) else f'`"{value}"`'
    return f'`"{value}"`'


def _range(info: Any) -> str:
    parts = []
    for m in info.metadata:
        for attr, sym in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v:_}".replace("_", " "))
        if getattr(m, "min_length", None) is not None:
            parts.append(f"length ≥ {m.min_length}")
        if getattr(m, "max_length", None) is not None:
            parts.append(f"length ≤ {m.max_length}")
        if getattr(m, "pattern", None) is not None:
            parts.append(f"`{m.pattern}`")
    return ", ".join(parts)


def config_reference() -> str:
    """The configuration reference (Markdown), one table per section, from the schemas."""
    out = []
    for name, model in Config.sections().items():
        header = f"[[{name}]]" if name != "daemon" and _is_array(name) else f"[{name}]"
        doc = (model.__doc__ or "").strip().split(":", 1)[-1].strip()
        doc = doc[:1].upper() + doc[1:]
        out += [f"#### `{header}`", "", doc, "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        for key, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            kind = str(extra.get("toml_type") or _type_name(info.annotation))
            if info.is_required():
                default = "required"
            else:
                default = str(extra.get("toml_default") or _toml_value(info.default))
                if default.startswith('"'):
                    default = f"`{default}`"
            out.append(f"| `{key}` | {kind} | {default} | {_range(info)} | {info.description or ''} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


README_START = "<!-- config-reference: generated by `python -m moldd.config --markdown`; do not edit -->"
README_END = "<!-- end of config-reference -->"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--markdown"]:
        sys.stdout.write(config_reference())
        return 0
    if len(args) == 2 and args[0] == "--update-readme":
        readme = Path(args[1])
        text = readme.read_text()
        head, _, rest = text.partition(README_START)
        _, _, tail = rest.partition(README_END)
        readme.write_text(f"{head}{README_START}\n\n{config_reference()}\n{README_END}{tail}")
        return 0
    print("usage: python -m moldd.config --markdown | --update-readme README.md", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
