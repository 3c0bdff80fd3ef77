"""The read model: VMs, hosts, groups and jobs as the log says they are. Plain data, JSON-ready."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar

import orjson

from moldd.domain.states import VMState

T = TypeVar("T")


_Spec = tuple[frozenset[str], tuple[tuple[str, Any, Any], ...], frozenset[str]]
_SPECS: dict[type, _Spec] = {}


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        fs = fields(cls)
        defaults = tuple(
            (f.name, f.default, f.default_factory)
            for f in fs
            if f.default is not MISSING or f.default_factory is not MISSING
        )
        required = frozenset(f.name for f in fs) - {name for name, _, _ in defaults}
        spec = _SPECS[cls] = (frozenset(f.name for f in fs), defaults, required)
    return spec


def _from(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**known fields of data)``, without running the dataclass ``__init__`` (whose every assignment goes
    through ``_Viewed.__setattr__``): restoring a snapshot of 100,000 VMs is millions of calls less."""
    names, defaults, required = _spec(cls)
    missing = required - data.keys()
    if missing:
        raise TypeError(f"{cls.__name__} is missing required fields: {', '.join(sorted(missing))}")
    obj = cls.__new__(cls)
    d = obj.__dict__
    for name, default, factory in defaults:
        if name not in data:
            d[name] = default if factory is MISSING else factory()
    for k, v in data.items():
        if k in names:
            d[k] = v
    d["_view"] = None
    return obj


_SCALARS = frozenset({str, int, float, bool, type(None)})


def _json_copy(value: Any) -> Any:
    """A private copy of a JSON-like tree (dicts, lists, tuples of scalars): ``asdict``'s copy, minus its cost.
    Enum members (``VMState``) become their plain values, which encode faster and compare equal."""
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict:
        return {k: v if type(v) in _SCALARS else _json_copy(v) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _SCALARS else _json_copy(v) for v in value]
    if kind is tuple:
        return tuple(_json_copy(v) for v in value)
    if isinstance(value, Enum):
        return _json_copy(value.value)
    return value


class View(dict[str, Any]):
    """The JSON view of a read-model object, shared by every reader until the object changes: read-only.

    It caches its own JSON encoding (``encoded_json()``, an ``orjson.Fragment``), which the API splices
    into a reply instead of encoding the same VM again for every list."""

    __slots__ = ("_json",)

    def encoded_json(self) -> orjson.Fragment:
        try:
            return self._json
        except AttributeError:
            self._json: orjson.Fragment = orjson.Fragment(orjson.dumps(self, default=str))
            return self._json


class _Viewed:
    """``to_dict()`` / ``view()`` from a cached view, dropped by any attribute assignment.

    The view is built once per change, as a private copy (like ``asdict``: later folds never show
    through it, so a snapshot or reply taken from it stays consistent). ``view()`` returns it as is
    (read-only); ``to_dict()`` returns a fresh top-level dict over it: callers may add or replace keys,
    but the nested containers (``offering``, ``snapshots``, ...) are shared and must not be mutated.
    The fold changes nested containers only in the same step as attribute assignments (``vm.position``
    at least), so every change drops the view.
    """

    _FIELDS: ClassVar[tuple[str, ...]] = ()

    def __setattr__(self, name: str, value: Any) -> None:
        d = self.__dict__  # plain dataclass fields: no descriptors, so this is object.__setattr__, cheaper
        d[name] = value
        d["_view"] = None

    def view(self) -> View:
        view: View | None = self.__dict__.get("_view")
        if view is None:
            d = self.__dict__
            scalars = _SCALARS
            view = View({n: v if type(v := d[n]) in scalars else _json_copy(v) for n in self._FIELDS})
            self.__dict__["_view"] = view
        return view

    def to_dict(self) -> dict[str, Any]:
        return dict(self.view())


@dataclass
class VM(_Viewed):
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VM:
        """From a snapshot's JSON: states come back as ``VMState`` members, as the fold keeps them (a plain
        string here made ``states.check`` fail with AttributeError after every daemon restart)."""
        vm = _from(cls, data)
        object.__setattr__(vm, "state", VMState(vm.state))
        if vm.prior_state is not None:
            object.__setattr__(vm, "prior_state", VMState(vm.prior_state))
        return vm


@dataclass
class Host(_Viewed):
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Host:
        return _from(cls, data)


@dataclass
class Group(_Viewed):
    name: str
    created_at: str
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Group:
        return _from(cls, data)


@dataclass
class Job(_Viewed):
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        return _from(cls, data)


for _cls in (VM, Host, Group, Job):
    _cls._FIELDS = tuple(f.name for f in fields(_cls))
