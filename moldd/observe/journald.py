"""Structured log records for systemd-journald, through its native protocol (no libsystemd needed).

Under systemd, each record is sent as one datagram to ``/run/systemd/journal/socket`` carrying fields:
``MESSAGE`` (the same JSON line moldd prints otherwise), ``PRIORITY`` (from the level), ``SYSLOG_IDENTIFIER``,
``MOLDD_EVENT`` (the record's event name) and one ``MOLDD_<KEY>`` per scalar field of the record: ``MOLDD_VM``,
``MOLDD_HOST``, ``MOLDD_COMMAND_ID``, ``MOLDD_JOB``, ``MOLDD_EVENT_TYPE``... A log entry's ``position`` becomes
``MOLDD_EVENT_POSITION``. So ``journalctl MOLDD_VM=web-1`` lists everything about one VM, and
``journalctl -p err -u moldd`` the errors.

Protocol (systemd.journal-fields(7), "native protocol"): ``KEY=value\\n`` per field; a value holding a newline
is sent as ``KEY\\n`` + its length (little-endian u64) + the bytes + ``\\n``. A record too large for one
datagram goes in a sealed memfd whose descriptor is passed with ``SCM_RIGHTS``.

When to use it: ``$JOURNAL_STREAM`` names stderr's device and inode (systemd connected stderr to the journal),
unless ``$MOLDD_LOG_TARGET`` says ``stderr`` (or ``journal`` to force it).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

DEFAULT_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "moldd"

# syslog priorities (journald's PRIORITY field)
PRIORITIES = {
    "critical": 2,
    "exception": 3,
    "error": 3,
    "warning": 4,
    "warn": 4,
    "info": 6,
    "debug": 7,
}
# a record's own field name -> journal field (the rest become MOLDD_<UPPER NAME>)
RENAMED = {"position": "MOLDD_EVENT_POSITION", "event": "MOLDD_EVENT"}
SKIPPED = frozenset({"level", "timestamp", "exc_info", "stack_info", "_record", "_from_structlog"})
_KEY_OK = re.compile(r"^[A-Z0-9][A-Z0-9_]{0,63}$")
_MEMFD_SEALS = ("F_SEAL_SHRINK", "F_SEAL_GROW", "F_SEAL_WRITE", "F_SEAL_SEAL")


def journal_field(name: str) -> str | None:
    """The journal field for a record key (``vm`` → ``MOLDD_VM``), or ``None`` when it cannot be one."""
    if name in RENAMED:
        return RENAMED[name]
    key = "MOLDD_" + re.sub(r"[^A-Z0-9_]", "_", name.upper())
    return key if _KEY_OK.match(key) else None


def encode(fields: Mapping[str, str | bytes]) -> bytes:
    """The native-protocol datagram for ``fields`` (keys: upper case letters, digits, ``_``)."""
    out = bytearray()
    for key, value in fields.items():
        if not _KEY_OK.match(key):
            raise ValueError(f"{key!r} is not a journal field name (A-Z, 0-9 and _, not starting with _)")
        data = value.encode("utf-8", "replace") if isinstance(value, str) else value
        k = key.encode()
        if b"\n" in data:
            out += k + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += k + b"=" + data + b"\n"
    return bytes(out)


def record_fields(event_dict: Mapping[str, Any], message: str) -> dict[str, str]:
    """Journal fields of one structlog record (``message`` is its rendered line)."""
    level = str(event_dict.get("level", "info")).lower()
    fields = {
        "MESSAGE": message,
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
    }
    for name, value in event_dict.items():
        if name in SKIPPED or value is None or isinstance(value, (dict, list, tuple, set)):
            continue
        key = journal_field(str(name))
        if key is not None and key not in fields:
            fields[key] = value if isinstance(value, str) else str(value)
    if "exception" in event_dict and isinstance(event_dict["exception"], str):
        fields["MOLDD_EXCEPTION"] = event_dict["exception"]
    return fields


class JournalSender:
    """Sends records to journald's native socket. ``send`` returns ``False`` (never raises) when it could not,
    so the caller can print the line instead."""

    def __init__(self, path: str = DEFAULT_SOCKET) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(self, fields: Mapping[str, str | bytes]) -> bool:
        data = encode(fields)
        try:
            self._sock.sendto(data, self.path)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                return False
        return self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> bool:
        """Too large for a datagram: hand journald a sealed memfd with the record."""
        try:
            fd = os.memfd_create("moldd-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError:
            return False
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            seals = 0
            for name in _MEMFD_SEALS:
                seals |= getattr(fcntl, name, 0)
            with contextlib.suppress(OSError, AttributeError):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            self._sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))], 0, self.path
            )
            return True
        except OSError:
            return False
        finally:
            os.close(fd)

    def close(self) -> None:
        self._sock.close()


def stderr_is_journal(env: Mapping[str, str], stream: TextIO | None) -> bool:
    """``$JOURNAL_STREAM`` (``dev:inode``) names the file ``stream`` writes to: systemd sent it to the journal."""
    value = env.get("JOURNAL_STREAM", "")
    if not value or stream is None:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError, TypeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def use_journal(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """Whether records should go to journald: ``$MOLDD_LOG_TARGET`` = ``journal`` / ``stderr`` decides, else
    ``auto``: only when ``$JOURNAL_STREAM`` says stderr is the journal."""
    env = os.environ if env is None else env
    target = env.get("MOLDD_LOG_TARGET", "auto").strip().lower()
    if target == "journal":
        return True
    if target in ("stderr", "json", "console"):
        return False
    return stderr_is_journal(env, stream)


class JournalRenderer:
    """The last structlog processor in journal mode: renders the line with ``renderer`` (for ``MESSAGE``), sends
    the record with its fields, and drops it from the stream (``drop=True``; the stdlib path returns ``""``
    instead, which its handler skips). If journald cannot be reached the line is printed as usual."""

    def __init__(self, sender: JournalSender, renderer: Callable[..., Any], *, drop: bool = True) -> None:
        self.sender = sender
        self.renderer = renderer
        self.drop = drop

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> str:
        fields_source = dict(event_dict)
        fields_source.setdefault("level", method)
        line = self.renderer(logger, method, event_dict)
        text = line.decode() if isinstance(line, bytes) else str(line)
        if self.sender.send(record_fields(fields_source, text)):
            if self.drop:
                raise structlog.DropEvent
            return ""
        return text
