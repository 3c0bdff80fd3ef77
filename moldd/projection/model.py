"""The read model: VMs, hosts, groups and jobs as the log says they are. Plain data, JSON-ready."""

from __future__ import annotations

from collections.abc import Iterator, KeysView, Mapping
from dataclasses import MISSING, dataclass, field, fields
from enum import Enum
from operator import attrgetter, itemgetter
from typing import Any, ClassVar, TypeVar, cast, dataclass_transform

import orjson

from moldd.domain.states import VMState

T = TypeVar("T")


def _from(cls: type[T], data: dict[str, Any]) -> T:
    """``cls(**known fields of data)``: unknown keys are ignored (a snapshot written by a newer moldd), missing
    required ones refused by name. The arguments go by position: keyword arguments whose names were decoded from
    JSON (not the interned names of the code) are matched by comparing strings, ~60 µs for a VM's 37 fields."""
    if data.keys() >= cls._NAMES:  # type: ignore[attr-defined]  # every field there (this version's snapshot)
        return cls(*cls._ITEMS(data))  # type: ignore[attr-defined]
    missing = cls._REQUIRED - data.keys()  # type: ignore[attr-defined]
    if missing:
        raise TypeError(f"{cls.__name__} is missing required fields: {', '.join(sorted(missing))}")
    args = []
    for name, default, factory in cls._DEFAULTS:  # type: ignore[attr-defined]
        if name in data:
            args.append(data[name])
        elif factory is not MISSING:
            args.append(factory())
        else:
            args.append(default)
    return cls(*args)


_STATES: dict[Any, VMState] = {s.value: s for s in VMState}
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
    """A ``dict`` shared read-only by every reader until what it shows changes (the CloudStack layer's shape of a
    VM; read-model records give a ``RecordView``).

    It caches its own JSON encoding (``encoded_json()``, an ``orjson.Fragment``), which the API splices
    into a reply instead of encoding the same VM again for every list."""

    __slots__ = ("_json",)

    def encoded_json(self) -> orjson.Fragment:
        try:
            return self._json
        except AttributeError:
            # a copy of orjson's output: the bytes orjson returns keep its whole write buffer (~8 KiB for a VM's
            # ~1 KiB), and 10,000 cached VMs made that 80 MiB
            self._json: orjson.Fragment = orjson.Fragment(bytes(memoryview(orjson.dumps(self, default=str))))
            return self._json


class RecordView(Mapping[str, Any]):
    """The JSON view of a read-model record as it was when taken, shared read-only by every reader until the
    record changes: a mapping of its fields (states as their plain values) over a tuple of the field values.

    Nested containers (``offering``, ``snapshots``, ...) are the record's own, not copies: the fold never changes
    them in place, it replaces them (copy on write), so a view keeps what it was taken from; readers must not
    change them either. The view caches its JSON (``encoded_json()``, an ``orjson.Fragment``), which the API
    splices into replies. About 0.4 KiB per VM plus its ~1 KiB of JSON, where a dict view with private copies
    of the nested containers took ~1.5 KiB (15 MiB for 10,000 listed VMs)."""

    __slots__ = ("_index", "_json", "_values")

    def __init__(self, index: dict[str, int], values: tuple[Any, ...]) -> None:
        self._index = index
        self._values = values

    def __getitem__(self, key: str) -> Any:
        value = self._values[self._index[key]]
        return value._value_ if isinstance(value, Enum) else value

    def get(self, key: str, default: Any = None) -> Any:
        i = self._index.get(key)
        if i is None:
            return default
        value = self._values[i]
        return value._value_ if isinstance(value, Enum) else value

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def keys(self) -> KeysView[str]:
        return self._index.keys()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RecordView) and other._index is self._index:
            return bool(self._values == other._values)
        if not isinstance(other, Mapping):
            return NotImplemented
        return dict(self.items()) == dict(other.items())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"RecordView({dict(self.items())!r})"

    def encoded_json(self) -> orjson.Fragment:
        try:
            return self._json
        except AttributeError:
            # a copy of orjson's output: the bytes orjson returns keep its whole write buffer (~8 KiB for a VM's
            # ~1 KiB), and 10,000 cached VMs made that 80 MiB. (orjson writes Enum members as their values.)
            raw = orjson.dumps(dict(zip(self._index, self._values, strict=True)), default=str)
            self._json: orjson.Fragment = orjson.Fragment(bytes(memoryview(raw)))
            return self._json


class _Viewed:
    """``view()`` cached until any attribute assignment; ``to_dict()`` a fresh private copy each time.

    The view (a ``RecordView``) is taken once per change: the field values as they are then, so later folds never
    show through it and a reply taken from it stays consistent. Its nested containers (``offering``,
    ``snapshots``, ...) are the record's: the fold replaces them, never changes them in place, and readers must
    not change them. ``to_dict()`` is a fresh dict with private copies of them (like ``asdict``): the caller's.

    How, cheaply: the records are slotted classes whose assignments are plain slot stores (the fold makes
    millions). ``view()`` stores the view in the ``_view`` slot and switches the object to its class's *viewed*
    twin (same slots, ``isinstance`` of the class), whose ``__setattr__`` drops the view and switches it back.
    So only the first assignment after a view was taken pays for a Python-level hook; a replay at start-up,
    where nobody has taken views, pays for none."""

    __slots__ = ("_view",)
    _FIELDS: ClassVar[tuple[str, ...]] = ()
    _NAMES: ClassVar[frozenset[str]] = frozenset()
    _REQUIRED: ClassVar[frozenset[str]] = frozenset()
    _DEFAULTS: ClassVar[tuple[tuple[str, Any, Any], ...]] = ()  # (name, default, default_factory) of each field
    _VALUES: ClassVar[Any]  # attrgetter of the fields: record -> tuple of their values
    _ITEMS: ClassVar[Any]  # itemgetter of the fields: dict -> tuple of their values
    _INDEX: ClassVar[dict[str, int]]  # field name -> its place in _VALUES' tuple (shared by the views)
    _view: RecordView
    _PLAIN: ClassVar[type]  # the record class itself
    _VIEWED: ClassVar[type]  # its twin while a view is cached

    def view(self) -> RecordView:
        view = RecordView(self._INDEX, self._VALUES(self))
        _set(self, "_view", view)
        _set(self, "__class__", self._VIEWED)
        return view

    def to_dict(self) -> dict[str, Any]:
        """The fields as a fresh dict, nested containers copied (like ``dataclasses.asdict``), states as their
        plain values: the caller's own."""
        scalars = _SCALARS
        values = zip(self._FIELDS, self._VALUES(self), strict=True)
        return {n: v if type(v) in scalars else _json_copy(v) for n, v in values}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Viewed) or other._PLAIN is not self._PLAIN:
            return NotImplemented
        return bool(self._VALUES(self) == other._VALUES(other))

    __hash__ = None  # type: ignore[assignment]  # mutable records, compared by value (as dataclasses are)

    def __reduce__(self) -> tuple[Any, ...]:
        """Copied and pickled as the record class with its field values (not the viewed twin, nor its view)."""
        return (self._PLAIN, self._VALUES(self))


_set = object.__setattr__


def _viewed_twin(cls: type[_Viewed]) -> type[_Viewed]:
    """``cls`` while a view is cached (see ``_Viewed``)."""

    def view(self: _Viewed) -> RecordView:
        try:
            view: RecordView = self._view
            return view
        except AttributeError:  # made directly as the twin (dataclasses.replace of a viewed record)
            return cls.view(self)

    def __setattr__(self: _Viewed, name: str, value: Any) -> None:
        _set(self, name, value)
        if name != "_view":
            _set(self, "_view", None)  # the view's memory goes now
            _set(self, "__class__", cls)

    twin = type(cls.__name__, (cls,), {"__slots__": (), "view": view, "__setattr__": __setattr__})
    twin.__qualname__ = cls.__qualname__  # repr and error messages name the record
    twin.__module__ = cls.__module__
    return twin


@dataclass_transform(field_specifiers=(field,))
def _record(cls: type[T]) -> type[T]:
    """A read-model record: a slotted dataclass (compared by value) with its viewed twin."""
    dc: Any = dataclass(slots=True, eq=False)(cls)
    fs = fields(dc)
    dc._FIELDS = tuple(f.name for f in fs)
    dc._NAMES = frozenset(dc._FIELDS)
    dc._REQUIRED = frozenset(f.name for f in fs if f.default is MISSING and f.default_factory is MISSING)
    dc._DEFAULTS = tuple((f.name, f.default, f.default_factory) for f in fs)  # in the constructor's order
    dc._VALUES = attrgetter(*dc._FIELDS)  # (every record has several fields: a tuple)
    dc._INDEX = {name: i for i, name in enumerate(dc._FIELDS)}
    dc._ITEMS = itemgetter(*dc._FIELDS)
    dc._PLAIN = dc
    dc._VIEWED = _viewed_twin(dc)
    return cast(type[T], dc)


@_record
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
        vm.state = _STATES.get(vm.state) or VMState(vm.state)  # (the lookup: Enum calls are slow)
        if vm.prior_state is not None:
            vm.prior_state = _STATES.get(vm.prior_state) or VMState(vm.prior_state)
        return vm


@_record
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


@_record
class Group(_Viewed):
    name: str
    created_at: str
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Group:
        return _from(cls, data)


@_record
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


class Captured:
    """Records of one kind (name -> record) captured for a snapshot: their field values as they are now, to be
    turned into dicts and encoded later, on another thread (``moldd.app.projector.encode_snapshot``). The
    values share the records' containers, which the fold replaces and never changes in place."""

    __slots__ = ("fields", "rows")

    def __init__(self, fields: tuple[str, ...], rows: dict[str, tuple[Any, ...]]) -> None:
        self.fields = fields
        self.rows = rows

    @classmethod
    def of(cls, kind: type[_Viewed], records: dict[str, Any]) -> Captured:
        values = kind._VALUES
        if len(kind._FIELDS) == 1:  # attrgetter of one name gives the value, not a tuple
            return cls(kind._FIELDS, {k: (values(r),) for k, r in records.items()})
        return cls(kind._FIELDS, {k: values(r) for k, r in records.items()})

    def record(self, name: str) -> dict[str, Any]:
        """The record's fields as a dict (states as ``VMState`` members, which JSON encoders write as their
        values: the same JSON as ``to_dict()``'s)."""
        return dict(zip(self.fields, self.rows[name], strict=True))
