"""moldctl: the command line over moldd's Unix socket.

People get aligned tables; scripts pass ``--json`` and read the result as JSON on stdout.
Exit codes: 0 ok, 1 the daemon refused the command or its job failed, 2 usage error,
3 the daemon is unreachable.

Every friendly subcommand is one row of :data:`COMMANDS`: its words, the verb it sends, and how its
options become the verb's arguments. ``moldctl call <verb> key=value ...`` reaches any verb.

Jobs
----
A command whose work outlives the request replies with a job::

    {"job": {"id": "<job id = command id>",
             "status": "pending" | "running" | "succeeded" | "failed",
             "vm": "<vm name or null>", "state": "<the VM's state now or null>",
             "result": <any JSON, once succeeded>,
             "error": {"code": ..., "message": ..., "field": ...}   # once failed
    }}

``queryAsyncJobResult {"jobid": id}`` returns the same shape. moldctl follows a job by reading
``GET /v1/events?correlation=<job id>&from=<position>`` (printing each event as it arrives) and asking
``queryAsyncJobResult`` every 0.5 s (and after each event) until the status is final.

Only the standard library is imported, so the command starts fast.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import queue
import re
import socket
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

DEFAULT_SOCKET = "/run/moldd/moldd.sock"
FINAL_STATUSES = ("succeeded", "failed")
FINAL_EVENT_WAIT_S = 3.0
"""How long a followed job, once the daemon says it ended, waits for its ending event on the stream."""
POLL_INTERVAL_S = 0.5
DEFAULT_TIMEOUT_S = 120.0

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


# --------------------------------------------------------------------------------------------- client


class Unreachable(Exception):
    """The daemon's socket cannot be reached (missing, refused, permission, timeout, dropped)."""


class CommandFailed(Exception):
    def __init__(self, code: str, message: str, field: str | None = None, status: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.field, self.status = code, message, field, status

    @classmethod
    def from_error(cls, error: Any, status: int = 0) -> CommandFailed:
        if not isinstance(error, dict):
            return cls("error", str(error), None, status)
        return cls(
            str(error.get("code") or "error"), str(error.get("message") or error), error.get("field"), status
        )

    def __str__(self) -> str:
        extra = ([f"field: {self.field}"] if self.field else []) + [f"code: {self.code}"]
        return f"{self.message} ({', '.join(extra)})"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("moldd", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Client:
    """A small synchronous client of the moldd socket API."""

    def __init__(self, socket_path: str, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _unreachable(self, exc: BaseException) -> Unreachable:
        if isinstance(exc, FileNotFoundError):
            why = "no such socket (is moldd running? use --socket or $MOLDD_SOCKET)"
        elif isinstance(exc, ConnectionRefusedError):
            why = "connection refused (is moldd running?)"
        elif isinstance(exc, PermissionError):
            why = "permission denied (are you in the moldd group?)"
        elif isinstance(exc, TimeoutError):
            why = "timed out"
        else:
            why = str(exc) or type(exc).__name__
        return Unreachable(f"cannot reach moldd at {self.socket_path}: {why}")

    def _request(self, method: str, url: str, body: bytes | None = None) -> tuple[int, Any]:
        conn = _UnixHTTPConnection(self.socket_path, self.timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, url, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from None
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw) if raw else None
        except ValueError:
            raise CommandFailed(
                "bad_reply", f"moldd sent a reply that is not JSON (HTTP {resp.status})"
            ) from None

    def call(self, verb: str, args: dict[str, Any], command_id: str | None = None) -> tuple[Any, int | None]:
        """Send one command; ``(result, position)``, or ``CommandFailed`` with the daemon's error."""
        envelope: dict[str, Any] = {"command": verb, "args": args}
        if command_id is not None:
            envelope["id"] = command_id
        status, reply = self._request("POST", "/v1/command", json.dumps(envelope).encode())
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else reply
            raise CommandFailed.from_error(error or f"HTTP {status}", status)
        return reply.get("result"), reply.get("position")

    def health(self) -> tuple[int, Any]:
        return self._request("GET", "/v1/health")

    def events(
        self,
        from_position: int | None = None,
        stream: str | None = None,
        correlation: str | None = None,
        opened: Callable[[_UnixHTTPConnection], None] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Entries of ``GET /v1/events`` as they arrive, heartbeats included (``{"heartbeat": t}``)."""
        params = {"from": from_position, "stream": stream, "correlation": correlation}
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        # Heartbeats come every ~10 s; three missed means the daemon is gone.
        conn = _UnixHTTPConnection(self.socket_path, 35.0)
        try:
            try:
                conn.request("GET", "/v1/events" + (f"?{query}" if query else ""))
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from None
            if opened is not None:
                opened(conn)
            if resp.status != 200:
                try:
                    reply = json.loads(resp.read())
                except ValueError:
                    reply = {}
                raise CommandFailed.from_error(reply.get("error") or f"HTTP {resp.status}", resp.status)
            while True:
                try:
                    line = resp.readline()
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    raise self._unreachable(exc) from None
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            conn.close()


# ------------------------------------------------------------------------------------ the command table


@dataclass(frozen=True)
class Opt:
    """One command-line argument and the verb argument it fills (``arg=None``: not sent)."""

    flags: tuple[str, ...]
    arg: str | None
    kwargs: dict[str, Any] = field(default_factory=dict)


def pos(name: str, arg: str, help: str = "") -> Opt:
    return Opt((name,), arg, {"help": help, "metavar": name.upper()})


def opt(flag: str, arg: str, help: str = "", **kw: Any) -> Opt:
    return Opt((flag,), arg, {"help": help, "metavar": flag.lstrip("-").upper().replace("-", "_"), **kw})


def flag(flag_: str, arg: str, help: str = "") -> Opt:
    return Opt((flag_,), arg, {"help": help, "action": "store_true", "default": None})


@dataclass(frozen=True)
class Cmd:
    words: str  # "vm start"
    verb: str
    help: str
    opts: tuple[Opt, ...] = ()
    columns: tuple[str, ...] = ()  # preferred table columns, those present are shown in this order
    fixed: dict[str, Any] = field(default_factory=dict)  # arguments always sent
    single: bool = False  # show one object as "key: value" lines (e.g. ``vm show``)
    follow: bool = True  # follow a job in the reply until it ends (unless --no-wait)


NAME = pos("name", "name", "the VM name (ID)")
VM = pos("name", "vm", "the VM name (ID)")
VM_COLUMNS = (
    "name", "display_name", "state", "power_state", "host", "hostname", "group", "template", "iso",
    "ha_enabled", "ha_status", "internal_name",
)  # fmt: skip
HOST_COLUMNS = ("name", "cluster", "health", "link", "vms", "running", "max_vms", "uri")
EVENT_COLUMNS = ("position", "recorded_at", "stream_id", "event_type", "changed", "actor", "correlation_id")
EVENTS_CMD = Cmd("events", "listEvents", "list log entries", columns=EVENT_COLUMNS)

COMMANDS: tuple[Cmd, ...] = (
    Cmd("vm list", "listVirtualMachines", "list VMs",
        (opt("--group", "group"), opt("--state", "state"), opt("--host", "host")), VM_COLUMNS),
    Cmd("vm show", "listVirtualMachines", "show one VM", (NAME,), VM_COLUMNS, single=True),
    Cmd("vm deploy", "deployVirtualMachine", "create a VM from a template or an ISO, and start it", (
        opt("--template", "template", "template to clone the root disk from"),
        opt("--iso", "iso", "ISO to attach to a blank VM (to install an OS)"),
        opt("--offering", "serviceoffering", "service offering (CPU/memory)", required=True),
        opt("--name-display", "displayname", "display name (defaults to the VM name)"),
        opt("--hostname", "hostname", "guest host name (defaults to the VM name)"),
        opt("--group", "group"),
        flag("--ha", "haenable", "restart the VM if it goes down"),
        opt("--host", "host", "place it on this host"),
        opt("--root-disk-gb", "rootdisksize", "root disk size in GB", type=int),
        Opt(("--no-start",), "startvm", {"action": "store_false", "default": None, "help": "create only"}),
        Opt(("--details",), "details", {"action": "append", "metavar": "KEY=VALUE", "default": None,
                                       "help": "an advanced setting, e.g. kernel_args='quiet' (repeatable)"}),
    ), VM_COLUMNS),
    Cmd("vm start", "startVirtualMachine", "start a VM", (NAME, opt("--host", "host"))),
    Cmd("vm stop", "stopVirtualMachine", "stop a VM (ACPI shutdown)",
        (NAME, flag("--forced", "forced", "power off at once"))),
    Cmd("vm reboot", "rebootVirtualMachine", "reboot a running VM", (NAME,)),
    Cmd("vm destroy", "destroyVirtualMachine", "destroy a VM (recoverable until expunged)",
        (NAME, flag("--expunge", "expunge", "expunge at once"))),
    Cmd("vm recover", "recoverVirtualMachine", "bring a destroyed VM back (stopped)", (NAME,)),
    Cmd("vm expunge", "expungeVirtualMachine", "remove a destroyed VM for good", (NAME,)),
    Cmd("vm edit", "updateVirtualMachine", "change a VM's basic settings", (
        NAME, opt("--display-name", "displayname"), opt("--hostname", "hostname"), opt("--group", "group"),
        Opt(("--ha",), "haenable", {"action": "store_true", "default": None, "dest": "haenable"}),
        Opt(("--no-ha",), "haenable", {"action": "store_false", "default": None, "dest": "haenable"}),
    ), VM_COLUMNS),
    Cmd("vm migrate", "migrateVirtualMachine", "live-migrate a running VM", (NAME, opt("--host", "host"))),
    Cmd("vm scale", "scaleVirtualMachine", "change a VM's service offering",
        (NAME, opt("--offering", "serviceoffering", required=True))),
    Cmd("vm change-offering", "changeServiceForVirtualMachine", "change a stopped VM's service offering",
        (NAME, opt("--offering", "serviceoffering", required=True))),
    Cmd("vm resize", "resizeVolume", "resize a VM's root disk", (
        VM, opt("--size-gb", "size", "new size in GB", type=int, required=True),
        flag("--shrink-ok", "shrinkok", "allow shrinking"),
    )),
    Cmd("vm restore", "restoreVirtualMachine", "reinstall a VM from its template (or another)",
        (NAME, opt("--template", "template"))),
    Cmd("vm attach-iso", "attachIso", "attach an ISO", (VM, opt("--iso", "iso", required=True))),
    Cmd("vm detach-iso", "detachIso", "detach the ISO", (VM,)),
    Cmd("vm console", "getVirtualMachineConsole", "how to reach a VM's console", (NAME,), single=True),
    Cmd("vm snapshot create", "createVMSnapshot", "snapshot a VM", (
        VM, opt("--snapshot", "snapshot", "snapshot name"), opt("--description", "description"),
        flag("--memory", "memory", "include memory (running VMs only)"),
    )),
    Cmd("vm snapshot list", "listVMSnapshots", "list a VM's snapshots", (VM,),
        ("snapshot", "name", "state", "created", "memory", "description", "current")),
    Cmd("vm snapshot revert", "revertToVMSnapshot", "revert a VM to a snapshot",
        (VM, pos("snapshot", "snapshot"))),
    Cmd("vm snapshot delete", "deleteVMSnapshot", "delete a snapshot", (VM, pos("snapshot", "snapshot"))),
    Cmd("host list", "listHosts", "list hosts", (), HOST_COLUMNS),
    Cmd("cluster list", "listClusters", "list clusters", ()),
    Cmd("cluster status", "listManagementServers", "the moldd nodes on the shared log: leader, epoch, lag", (),
        single=True, follow=False),
    Cmd("group create", "createInstanceGroup", "create an instance group", (pos("group", "name"),)),
    Cmd("group list", "listInstanceGroups", "list instance groups", (), ("name", "vms", "created")),
    Cmd("group delete", "deleteInstanceGroup", "delete an instance group", (pos("group", "name"),)),
    Cmd("capacity", "listClusters", "cluster capacity (N-1 rule)", (),
        ("cluster", "hosts", "perhostlimit", "toleratedfailures", "used", "limit", "headroom")),
    Cmd("job show", "queryAsyncJobResult", "show a job", (pos("id", "jobid"),), single=True, follow=False),
    Cmd("user create", "createUser", "create a user with an API key pair (the secret key is shown once)", (
        pos("username", "username"), opt("--role", "role", "admin, operator or readonly (default readonly)"),
    ), single=True),
    Cmd("user list", "listUsers", "list users (never their secret keys)", (),
        ("name", "role", "state", "apikey", "created", "id")),
    Cmd("user revoke", "revokeUser", "revoke a user's API keys at once", (
        pos("username", "username"), opt("--reason", "reason", "why (recorded in the log)"),
    ), single=True),
    Cmd("user keys", "registerUserKeys", "a new API key pair for a user (the old pair stops working)",
        (pos("username", "username"),), single=True),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- parsing

_INT = re.compile(r"[+-]?\d+\Z")


def parse_value(text: str) -> Any:
    """``true``/``false`` → bool, integers → int, JSON objects/arrays → themselves, else the string."""
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    if text[:1] in ("{", "["):
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_pairs(tokens: Sequence[str]) -> dict[str, Any]:
    """``key=value`` (typed by :func:`parse_value`) and ``key:=<json>``; ``ValueError`` names the bad one."""
    args: dict[str, Any] = {}
    for token in tokens:
        key, sep, value = token.partition("=")
        if not sep or not key or key == ":":
            raise ValueError(f"expected key=value or key:=json, got {token!r}")
        if key.endswith(":"):
            try:
                args[key[:-1]] = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"{token!r}: not valid JSON after ':=' ({exc})") from None
        else:
            args[key] = parse_value(value)
    return args


class _Parser(argparse.ArgumentParser):
    """An argument parser that reports usage errors instead of exiting, so ``run`` owns the exit code."""

    def error(self, message: str) -> Any:
        raise _Usage(f"{self.prog}: error: {message}", self.format_usage())


class _Usage(Exception):
    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON")
    common.add_argument(
        "--no-wait", action="store_true", default=argparse.SUPPRESS, help="do not follow a job"
    )
    common.add_argument("--id", dest="command_id", default=argparse.SUPPRESS, help="client command id")
    # Accepted before or after the subcommand; run() fills in the defaults.
    common.add_argument(
        "--socket",
        default=argparse.SUPPRESS,
        help=f"moldd socket (default: $MOLDD_SOCKET or {DEFAULT_SOCKET})",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        help=f"seconds to wait for a reply (default {DEFAULT_TIMEOUT_S:g})",
    )

    parser = _Parser(prog="moldctl", description="Manage VMs through moldd.", parents=[common])
    top = parser.add_subparsers(dest="topic", metavar="COMMAND", parser_class=_Parser)
    top.required = True

    groups: dict[tuple[str, ...], Any] = {(): top}
    for cmd in COMMANDS:
        words = cmd.words.split()
        for depth in range(1, len(words)):
            prefix = tuple(words[:depth])
            if prefix not in groups:
                sub = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{' '.join(prefix)} commands")
                groups[prefix] = sub.add_subparsers(metavar="ACTION", parser_class=_Parser)
                groups[prefix].required = True
        p = groups[tuple(words[:-1])].add_parser(words[-1], help=cmd.help, parents=[common])
        for o in cmd.opts:
            kwargs = dict(o.kwargs)
            if o.flags[0].startswith("-") and "dest" not in kwargs:
                kwargs["dest"] = _dest(o)
            p.add_argument(*o.flags, **kwargs)
        p.set_defaults(cmd=cmd)

    p = top.add_parser("call", help="send any verb: call <verb> key=value key:=json ...", parents=[common])
    p.add_argument("verb")
    p.add_argument("pairs", nargs="*", metavar="key=value")
    p.set_defaults(action="call")
    p = top.add_parser("events", help="list log entries, or follow them live", parents=[common])
    p.add_argument(
        "--follow", "-f", action="store_true", help="stream new entries (from now on) until interrupted"
    )
    p.add_argument("--vm", help="only this VM's entries")
    p.add_argument(
        "--from", dest="from_position", type=int, help="start at this log position (with --follow: replay)"
    )
    p.add_argument("--correlation", help="only entries of this job / correlation id")
    p.add_argument(
        "--limit", type=int, default=100, help="at most this many entries (default 100): the newest, unless --from"
    )
    p.set_defaults(action="events")
    p = top.add_parser("health", help="daemon health", parents=[common])
    p.set_defaults(action="health")
    p = top.add_parser(
        "console", help="a running VM's console: VNC endpoint, serial pty and log", parents=[common]
    )
    p.add_argument("name", metavar="NAME", help="the VM name (ID)")
    p.add_argument("--follow", "-f", action="store_true", help="print the serial console log as it grows")
    p.add_argument(
        "--for", dest="follow_for", type=float, metavar="SECONDS", help="stop following after this long"
    )
    p.set_defaults(action="console")
    return parser


def _dest(o: Opt) -> str:
    return "opt_" + o.flags[0].lstrip("-").replace("-", "_")


def command_args(cmd: Cmd, ns: argparse.Namespace) -> dict[str, Any]:
    """The verb arguments of a friendly subcommand; options left unset are not sent."""
    args = dict(cmd.fixed)
    for o in cmd.opts:
        if o.arg is None:
            continue
        dest = o.kwargs.get("dest") or (_dest(o) if o.flags[0].startswith("-") else o.flags[0])
        value = getattr(ns, dest, None)
        if value is not None:
            if o.kwargs.get("action") == "append" and o.arg == "details":
                value = _pairs(value, "--details")
            args[o.arg] = value
    return args


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    """``["k=v", ...]`` → ``{"k": "v"}``; a malformed item is a usage error naming the flag."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CommandFailed("bad_argument", f"{flag} takes key=value, got {item!r}", flag.lstrip("-"))
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------- output


def _nested(value: Any) -> bool:
    """An object, or a list holding objects or lists: too big for a table cell."""
    return isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, dict | list) for v in value)
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value == {}:
        return "-"
    if isinstance(value, list) and not _nested(value):
        return ", ".join(_cell(v) for v in value) or "-"
    if isinstance(value, dict | list):
        return _escape(json.dumps(value, separators=(",", ":"), ensure_ascii=False))
    return _escape(str(value))  # a name holding U+202E or an escape sequence cannot spoof the table


def _escape(text: str) -> str:
    """Control and format characters (bidi overrides, escape sequences, zero-width) shown as \\uXXXX."""
    return "".join(
        f"\\u{ord(c):04x}" if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp") else c for c in text
    )


def rows_of(result: Any) -> list[dict[str, Any]] | None:
    """The rows in a list reply: a bare list, or the one list in ``{"count": n, "<things>": [...]}``."""
    if isinstance(result, list):
        return [r if isinstance(r, dict) else {"value": r} for r in result]
    if isinstance(result, dict):
        lists = [v for v in result.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            return lists[0]
        if not result:
            return []
    return None


def format_table(rows: list[dict[str, Any]], preferred: Sequence[str] = ()) -> str:
    """Aligned columns: the ``preferred`` ones rows have, else every scalar key of the rows."""
    present: dict[str, None] = {}
    for row in rows:
        present.update(dict.fromkeys(row))
    columns = [c for c in preferred if c in present]
    if not columns:
        columns = [k for k in present if not any(_nested(r.get(k)) for r in rows)]
        columns = columns or list(present)
    table = [[c.upper() for c in columns]] + [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table
    )


def format_mapping(obj: dict[str, Any], indent: int = 0) -> str:
    """``key  value`` lines; a nested object is a ``key:`` line with its own lines indented below."""
    pad = " " * indent
    flat = [k for k, v in obj.items() if not (isinstance(v, dict) and v)]
    width = max((len(k) for k in flat), default=0)
    lines = []
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            lines += [f"{pad}{k}:", format_mapping(v, indent + 2)]
        else:
            lines.append(f"{pad}{k.ljust(width)}  {_cell(v)}".rstrip())
    return "\n".join(lines)


def render(result: Any, cmd: Cmd | None, out: TextIO) -> None:
    rows = rows_of(result)
    if cmd is not None and cmd.single and rows is not None:
        if not rows:
            raise CommandFailed("not_found", "nothing matched", None)
        for i, row in enumerate(rows):
            print(("\n" if i else "") + format_mapping(row), file=out)
        return
    if rows is not None:
        if rows:
            print(format_table(rows, cmd.columns if cmd else ()), file=out)
        else:
            print("(none)", file=out)
    elif isinstance(result, dict):
        # {"group": {...}}, {"job": {...}}: the one object itself
        (only,) = result.values() if len(result) == 1 else (None,)
        print(format_mapping(only if isinstance(only, dict) else result), file=out)
    elif result is None:
        print("ok", file=out)
    else:
        print(_cell(result), file=out)


_EVENT_DETAILS = (
    "event", "detail", "state", "host", "changes", "how", "cause", "status", "job_status", "reason", "error",
)  # fmt: skip


def event_changes(entry: dict[str, Any]) -> str:
    """What an entry says changed, as ``key=value ...`` (its state, host, cause, error, ...)."""
    payload = entry.get("payload")
    if not isinstance(payload, dict):
        payload = {}
    return " ".join(f"{k}={_cell(payload[k])}" for k in _EVENT_DETAILS if k in payload and payload[k] is not None)


def describe_event(entry: dict[str, Any], *, stream: bool = False) -> str:
    """``[position] type key=value ...`` (with the stream after the position when ``stream``)."""
    details = event_changes(entry)
    where = f" {entry.get('stream_id', '?')}" if stream else ""
    head = f"[{entry.get('position', '?')}]{where} {entry.get('event_type', '?')}"
    return f"{head} {details}" if details else head


# -------------------------------------------------------------------------------------------- jobs


def progress_of(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The progress a log entry reports (``*.progress`` events: ``{"progress": {"percent": ...}}``), if any."""
    if not str(entry.get("event_type", "")).endswith(".progress"):
        return None
    payload = entry.get("payload")
    prog = payload.get("progress") if isinstance(payload, dict) else None
    if not isinstance(prog, dict) or not isinstance(prog.get("percent"), (int, float)):
        return None
    return prog


def _size(n: Any) -> str:
    value = float(n) if isinstance(n, (int, float)) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


class ProgressBar:
    """Draws a job's progress: redrawn in place on a terminal, one line per update otherwise (logs, pipes),
    a JSON line per update with ``--json`` (``{"job": id, "progress": {...}}``)."""

    WIDTH = 30

    def __init__(self, out: TextIO, job_id: str, *, as_json: bool = False) -> None:
        self.out = out
        self.job_id = job_id
        self.as_json = as_json
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.drawn = False
        self.has_percent = False
        self.ticks = 0

    @staticmethod
    def line(prog: dict[str, Any], what: str = "", width: int = WIDTH) -> str:
        pct = max(0.0, min(100.0, float(prog["percent"])))
        filled = round(width * pct / 100)
        bar = "#" * filled + "." * (width - filled)
        detail = ""
        if prog.get("data_total"):
            done = int(prog.get("data_total", 0)) - int(prog.get("data_remaining", 0))
            detail = f"  {_size(done)} / {_size(prog['data_total'])}"
        label = f" {what}" if what else ""
        return f"[{bar}] {pct:5.1f} %{label}{detail}"

    def update(self, entry: dict[str, Any], prog: dict[str, Any]) -> None:
        what = str(entry.get("event_type", "")).removesuffix(".progress").split(".")[-1]
        if self.as_json:
            print(json.dumps({"job": self.job_id, "position": entry.get("position"), "event_type":
                              entry.get("event_type"), "progress": prog}), file=self.out, flush=True)  # fmt: skip
            return
        self.has_percent = True
        text = "  " + self.line(prog, what)
        if self.tty:
            print("\r\x1b[2K" + text, end="", file=self.out, flush=True)
            self.drawn = True
        else:
            print(text, file=self.out, flush=True)

    SPIN = "|/-\\"

    def tick(self, job: dict[str, Any], elapsed_s: float) -> None:
        """On a terminal, while no percentage is known (libvirt reports none for internal snapshots, resizes
        and starts): a spinner with the time so far and the VM's state, redrawn in place."""
        if self.as_json or not self.tty or self.has_percent or job.get("status") in FINAL_STATUSES:
            return
        self.ticks += 1
        state = f" (VM {job['state']})" if job.get("state") else ""
        spin = self.SPIN[self.ticks % len(self.SPIN)]
        print(f"\r\x1b[2K  {spin} {job.get('status') or 'pending'} {elapsed_s:.1f} s{state}", end="",
              file=self.out, flush=True)  # fmt: skip
        self.drawn = True

    def clear(self) -> None:
        """End the bar's line before other output."""
        if self.drawn:
            print(file=self.out, flush=True)
            self.drawn = False


def job_of(result: Any) -> dict[str, Any] | None:
    job = result.get("job") if isinstance(result, dict) else None
    return job if isinstance(job, dict) and "id" in job else None


def follow_job(
    client: Client,
    job: dict[str, Any],
    position: int | None,
    progress: TextIO,
    poll_interval_s: float = POLL_INTERVAL_S,
    *,
    as_json: bool = False,
) -> dict[str, Any]:
    """Print a job's events as they happen; return the job once its status is final.

    ``*.progress`` events (migration, resize, snapshot, deploy) draw a progress bar (:class:`ProgressBar`);
    with ``as_json`` every event is a JSON line (``{"job": id, "event": entry}`` or ``{"job": id,
    "progress": {...}}``).

    Events come from a reader thread over the NDJSON stream; the main thread polls
    ``queryAsyncJobResult`` after each event and every ``poll_interval_s``, so the job's end is seen
    even if the stream is unavailable. The poll can see the end before the stream has delivered the event
    that ended the job (the one whose payload carries ``job_status``: two connections): that event is then
    waited for, up to ``FINAL_EVENT_WAIT_S``, so the job's last event is printed before its outcome.
    """
    job_id = str(job["id"])
    if job.get("status") in FINAL_STATUSES:
        return job
    inbox: queue.Queue[dict[str, Any] | None] = queue.Queue()
    conns: list[_UnixHTTPConnection] = []

    def read_stream() -> None:
        try:
            for entry in client.events(position, correlation=job_id, opened=conns.append):
                if "heartbeat" not in entry:
                    inbox.put(entry)
        except Exception:  # the poll below still finds the job's end
            pass
        inbox.put(None)

    reader = threading.Thread(target=read_stream, name="moldctl-events", daemon=True)
    reader.start()
    status = job.get("status")
    bar = ProgressBar(progress, job_id, as_json=as_json)
    seen_end = False  # the event that ended the job has been shown
    stream_ended = False

    def show(entry: dict[str, Any]) -> None:
        nonlocal seen_end
        payload = entry.get("payload")
        if isinstance(payload, dict) and payload.get("job_status") in FINAL_STATUSES:
            seen_end = True
        prog = progress_of(entry)
        if prog is not None:
            bar.update(entry, prog)
            return
        bar.clear()
        if as_json:
            print(json.dumps({"job": job_id, "event": entry}), file=progress, flush=True)
        else:
            print("  " + describe_event(entry), file=progress, flush=True)

    def say(text: str) -> None:
        bar.clear()
        if as_json:
            print(json.dumps({"job": job_id, "status": text}), file=progress, flush=True)
        else:
            print(f"job {job_id}: {text}", file=progress, flush=True)

    say(status or "pending")
    started = time.monotonic()
    try:
        while True:
            try:
                entry = inbox.get(timeout=poll_interval_s)
            except queue.Empty:
                entry = None
            else:
                stream_ended = stream_ended or entry is None
            if entry is not None:
                show(entry)
            latest = job_of(client.call("queryAsyncJobResult", {"jobid": job_id})[0]) or job
            bar.tick(latest, time.monotonic() - started)
            if latest.get("status") != status:
                status = latest.get("status")
                if status not in FINAL_STATUSES:
                    say(str(status))
            if status in FINAL_STATUSES:
                # events already received are still worth showing, and the one that ended the job may still be
                # on its way over the stream
                deadline = time.monotonic() + FINAL_EVENT_WAIT_S
                while True:
                    try:
                        if seen_end or stream_ended:
                            pending = inbox.get_nowait()
                        else:
                            pending = inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    if pending is None:
                        stream_ended = True
                    else:
                        show(pending)
                bar.clear()
                return latest
    finally:
        for conn in conns:
            if conn.sock is not None:
                try:
                    conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


# -------------------------------------------------------------------------------------------- main


def _print_error(err: TextIO, exc: CommandFailed) -> None:
    print(f"error: {exc}", file=err)


def _finish(client: Client, ns: argparse.Namespace, cmd: Cmd | None, result: Any, position: int | None,
            out: TextIO, err: TextIO) -> int:  # fmt: skip
    as_json = getattr(ns, "json", False)
    job = job_of(result)
    if job is not None and (cmd is None or cmd.follow) and not getattr(ns, "no_wait", False):
        job = follow_job(client, job, position, err if as_json else out, as_json=as_json)
        result = {"job": job}
        if job.get("status") == "failed":
            if as_json:
                print(json.dumps(result, indent=2), file=out)
            _print_error(err, CommandFailed.from_error(job.get("error") or "the job failed"))
            return EXIT_FAILED
        if not as_json:
            vm = f" ({job['vm']}: {job['state']})" if job.get("vm") and job.get("state") else ""
            print(f"job {job['id']}: succeeded{vm}", file=out)
            if job.get("result") is not None:
                render(job["result"], cmd, out)
            return EXIT_OK
    if as_json:
        print(json.dumps(result, indent=2), file=out)
    else:
        render(result, cmd, out)
    return EXIT_OK


def _console(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    """Print how to reach the console; with --follow, tail the serial console log (like ``tail -f``)."""
    result, _ = client.call("getVirtualMachineConsole", {"id": ns.name})
    if getattr(ns, "json", False) and not ns.follow:
        print(json.dumps(result, indent=2), file=out)
        return EXIT_OK
    vnc, serial = result.get("vnc") or {}, result.get("serial") or {}
    if vnc:
        password = f" (password {vnc['password']})" if vnc.get("password") else ""
        print(f"vnc     {vnc.get('host')}:{vnc.get('port')}{password}", file=out)
    print(f"serial  {serial.get('pty') or '-'}", file=out)
    print(f"log     {serial.get('log') or '-'}", file=out, flush=True)
    if not ns.follow or not serial.get("log"):
        return EXIT_OK
    deadline = None if ns.follow_for is None else time.monotonic() + ns.follow_for
    try:
        with open(serial["log"], "rb") as log_file:
            while deadline is None or time.monotonic() < deadline:
                chunk = log_file.read(65536)
                if chunk:
                    out.write(chunk.decode(errors="replace"))
                    out.flush()
                else:
                    time.sleep(0.2)
    except FileNotFoundError:
        print(f"error: {serial['log']} does not exist (yet)", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def _events(client: Client, ns: argparse.Namespace, out: TextIO) -> int:
    stream = f"vm-{ns.vm}" if ns.vm else None
    as_json = getattr(ns, "json", False)
    if not ns.follow:
        args: dict[str, Any] = {}
        if ns.vm:
            args["vm"] = ns.vm
        if ns.from_position is not None:
            args["from"] = ns.from_position
        if ns.correlation:
            args["correlation"] = ns.correlation
        args["limit"] = ns.limit
        if ns.from_position is None:
            args["newest"] = True  # the last entries, not the oldest 100 of a long log
        result, _ = client.call("listEvents", args)
        if as_json:
            print(json.dumps(result, indent=2), file=out)
            return EXIT_OK
        if isinstance(result, dict) and isinstance(result.get("event"), list):
            for row in result["event"]:
                row["changed"] = event_changes(row)
        render(result, EVENTS_CMD, out)
        more = result.get("more") if isinstance(result, dict) else None
        if isinstance(more, dict) and more.get("older"):
            print(f"... {more['older']} older entries not shown (--from {more['from']} to start there, or --limit)",
                  file=out)  # fmt: skip
        if isinstance(more, dict) and more.get("newer"):
            print(f"... {more['newer']} newer entries not shown (--from {more['next']} to go on)", file=out)
        return EXIT_OK
    start = ns.from_position
    if start is None:  # like tail -f: what happens from now on, not a replay of the whole log
        _, health = client.health()
        head = health.get("position") if isinstance(health, dict) else None
        start = head + 1 if isinstance(head, int) and not isinstance(head, bool) else None
    try:
        for entry in client.events(start, stream=stream, correlation=ns.correlation):
            if "heartbeat" in entry:
                continue
            print(json.dumps(entry) if as_json else describe_event(entry, stream=True), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    return EXIT_OK


def run(argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run moldctl with ``argv``; returns the exit code."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
        cmd: Cmd | None = getattr(ns, "cmd", None)
        call_args = parse_pairs(ns.pairs) if getattr(ns, "action", None) == "call" else None
    except _Usage as exc:
        print(exc.usage + str(exc), file=err, end="\n")
        return EXIT_USAGE
    except ValueError as exc:
        print(f"moldctl: error: {exc}", file=err)
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    socket_path = getattr(ns, "socket", None) or os.environ.get("MOLDD_SOCKET") or DEFAULT_SOCKET
    client = Client(socket_path, timeout=getattr(ns, "timeout", DEFAULT_TIMEOUT_S))
    command_id = getattr(ns, "command_id", None)
    try:
        if cmd is not None:
            result, position = client.call(cmd.verb, command_args(cmd, ns), command_id)
            return _finish(client, ns, cmd, result, position, out, err)
        if ns.action == "call":
            result, position = client.call(ns.verb, call_args or {}, command_id)
            return _finish(client, ns, None, result, position, out, err)
        if ns.action == "events":
            return _events(client, ns, out)
        if ns.action == "console":
            return _console(client, ns, out)
        if ns.action == "health":
            status, health = client.health()
            if getattr(ns, "json", False):
                print(json.dumps(health, indent=2), file=out)
            elif isinstance(health, dict):
                print(format_mapping(health), file=out)
            return EXIT_OK if status == 200 else EXIT_FAILED
    except Unreachable as exc:
        print(f"error: {exc}", file=err)
        return EXIT_UNREACHABLE
    except CommandFailed as exc:
        _print_error(err, exc)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    parser.print_usage(err)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    code = run(argv)
    if os.environ.get("MOLDCTL_TIMING"):
        print(f"moldctl: {(time.monotonic() - started) * 1000:.1f} ms", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
