"""The read model: VMs, hosts, groups and jobs as the log says they are. Plain data, JSON-ready."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


def _from(cls: type[T], data: dict[str, Any]) -> T:
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class VM:
    name: str  # immutable RFC 1123 VM name
    id: int
    internal_name: str
    display_name: str
    hostname: str
    state: str
    uuid: str = ""  # libvirt domain UUID, fixed at deploy so every (re)definition is the same domain
    power_state: str = "off"
    group: str | None = None
    description: str = ""
    os_type: str = "Linux"
    host: str | None = None  # where it runs or last ran
    cluster: str | None = None
    ha_enabled: bool = False
    ha_policy: str = "always"
    ha_priority: int = 0
    offering: dict[str, Any] = field(default_factory=dict)
    template: str | None = None
    iso: str | None = None
    root_disk: dict[str, Any] = field(default_factory=dict)  # {"path": ..., "size_gb": ...}
    details: dict[str, Any] = field(default_factory=dict)  # advanced settings, applied at next start
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    current_snapshot: str | None = None
    created_at: str = ""
    updated_at: str = ""
    version: int = 0  # stream version of vm-<name>
    position: int = 0  # log position of the newest event applied
    prior_state: str | None = None  # state to return to when an in-progress command fails
    job: str | None = None  # id of the job running on this VM, if any
    stop_cause: str | None = None  # why it last went down: user, crashed, destroyed, guest-shutdown, ...
    down_at: str | None = None
    last_domain_event: dict[str, Any] | None = None
    error: str | None = None
    expunge_at: str | None = None
    ha_restarts: list[float] = field(default_factory=list)  # epoch seconds of HA restarts (recent window)
    ha_status: str | None = None  # None, "pending", "restarting", "failed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VM:
        return _from(cls, data)


@dataclass
class Host:
    name: str
    uri: str
    cluster: str
    max_vms: int
    link: str = "unknown"  # connected / disconnected / unknown
    health: str = "Up"  # Up, Suspect, Down, Fencing, Fenced, FenceFailed
    health_since: str = ""
    health_cause: str = ""
    link_since: str = ""
    position: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Host:
        return _from(cls, data)


@dataclass
class Group:
    name: str
    created_at: str
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Group:
        return _from(cls, data)


@dataclass
class Job:
    """One long-running command. Its id is the command id; the log events of its progress carry it as
    correlation id. ``status``: pending → running → succeeded | failed."""

    id: str
    command: str
    vm: str | None
    status: str
    created_at: str
    actor: str
    position: int
    updated_at: str = ""
    finished_at: str | None = None
    state: str | None = None  # the VM's state as of the newest event of the job
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    progress: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return _from(cls, data)
