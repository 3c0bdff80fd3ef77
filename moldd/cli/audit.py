"""``moldd-audit``: what an auditor or operator runs after an incident. Works on a copy of the log, read-only,
without the daemon; ``diff`` also reads the hosts (read-only libvirt connections).

Exit codes: 0 ok; 1 tampering (verify) or drift (diff) found; 2 could not check (bad input: one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from moldd.audit.errors import EXIT_ERROR, AuditError
from moldd.domain.names import escape_unsafe

PROG = "moldd-audit"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage + exits 2)
        say(f"{PROG}: error: {message} (see {PROG} --help)", file=sys.stderr)
        raise SystemExit(EXIT_ERROR)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Audit a moldd event log (read-only) and compare it with the hosts.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    v = sub.add_parser(
        "verify", help="check the log's integrity (exit 0 intact, 1 tampered, 2 could not check)"
    )
    v.add_argument("db", help="the log file (a copy is best)")
    v.add_argument(
        "--checkpoints", help="signed checkpoints file (JSON lines) to detect truncation/rewriting"
    )
    v.add_argument("--public-key", help="PEM public key that signed the checkpoints")
    v.add_argument("--json", action="store_true", help="print the report as JSON")

    s = sub.add_parser("state", help="the projected state (VMs, hosts, groups) at a position or time")
    s.add_argument("db")
    at = s.add_mutually_exclusive_group()
    at.add_argument("--at-position", metavar="P", help="fold events 1..P")
    at.add_argument(
        "--at-time", metavar="T", help="fold events recorded at or before T (ISO 8601; no zone = UTC)"
    )
    s.add_argument("--json", action="store_true")

    h = sub.add_parser("history", help="one VM's timeline: commands, libvirt events, state changes, HA")
    h.add_argument("db")
    h.add_argument("vm", help="VM name, numeric id or internal name")
    h.add_argument("--json", action="store_true")

    d = sub.add_parser("diff", help="compare the log with what the hosts run (exit 0 none, 1 drift, 2 error)")
    d.add_argument("db")
    d.add_argument("--live", required=True, metavar="CONFIG", help="moldd configuration (the hosts to read)")
    d.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for each host (default 15)")
    d.add_argument("--json", action="store_true")

    e = sub.add_parser("export", help="export events as JSON lines or CSV for a SIEM")
    e.add_argument("db")
    e.add_argument("--from", dest="from_position", metavar="P", help="first position (default 1)")
    e.add_argument("--to", dest="to_position", metavar="P", help="last position (default: the end)")
    e.add_argument("--format", required=True, choices=["jsonl", "csv"])
    e.add_argument("--output", metavar="FILE", help="write to FILE (default: standard output)")

    k = sub.add_parser("keygen", help="write checkpoint.key (0600) and checkpoint.pub in DIR")
    k.add_argument("dir")
    k.add_argument("--name", default="checkpoint", help="file name stem (default: checkpoint)")

    c = sub.add_parser("checkpoint", help="verify the log, then sign its head and append it to --out")
    c.add_argument("db")
    c.add_argument("--key", required=True, help="PEM Ed25519 private key")
    c.add_argument("--out", required=True, help="checkpoints file (JSON lines, appended)")
    c.add_argument("--no-verify", action="store_true", help="sign without verifying the log first")
    for name in ("verify", "state", "history", "diff", "export", "checkpoint"):  # db may be a DSN
        sub.choices[name].add_argument(
            "--schema", default="events", help="with a postgresql:// DSN as db: the schema holding the log"
        )
    return p


# -- formatting ------------------------------------------------------------------------------------------
def say(*parts: Any, file: Any = None) -> None:
    """print() for people: control and format characters of stored text (a name holding U+202E, an escape
    sequence) are shown as \\uXXXX, line by line, so the output cannot be spoofed."""
    text = " ".join(str(p) for p in parts)
    print("\n".join(escape_unsafe(line) for line in text.split("\n")), file=file)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("" if c is None else escape_unsafe(str(c))) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers).rstrip(), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*r).rstrip() for r in cells]
    return "\n".join(lines)


def _dump(data: Any) -> str:
    # JSON escapes the control characters; format characters (U+202E...) are escaped too
    return "\n".join(escape_unsafe(line) for line in json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False).split("\n"))


def _cmd_verify(args: argparse.Namespace) -> int:
    from moldd.audit.verify import audit_verify

    result = audit_verify(args.db, args.checkpoints, args.public_key)
    say(_dump(result.to_dict()) if args.json else result.render())
    if result.exit_code == EXIT_ERROR:
        say(f"{PROG}: could not check {args.db}: {result.error}", file=sys.stderr)
    return result.exit_code


def _cmd_state(args: argparse.Namespace) -> int:
    from moldd.audit.state import state_at

    st = state_at(args.db, at_position=args.at_position, at_time=args.at_time)
    view = st.view()
    if args.json:
        say(_dump(view))
        return 0
    say(
        f"log {st.log_id}: state at position {view['position']} of {st.last_position}"
        + (f", recorded {st.recorded_at}" if st.recorded_at else "")
    )
    say(f"\nVMs ({len(view['vms'])})")
    say(
        table(
            ["ID", "NAME", "DISPLAY NAME", "STATE", "POWER", "HOST", "GROUP", "HA", "JOB"],
            [
                [v["id"], v["name"], v["display_name"], v["state"], v["power_state"], v["host"], v["group"],
                 ("on" if v["ha_enabled"] else "off") + (f" ({v['ha_status']})" if v["ha_status"] else ""), v["job"]]
                for v in view["vms"]
            ],
        )
    )  # fmt: skip
    say(f"\nHosts ({len(view['hosts'])})")
    say(
        table(
            ["NAME", "CLUSTER", "LINK", "HEALTH", "VMS", "RUNNING", "MAX"],
            [
                [h["name"], h["cluster"], h["link"], h["health"], h["vms"], h["running"], h["max_vms"]]
                for h in view["hosts"]
            ],
        )
    )
    say(f"\nGroups ({len(view['groups'])})")
    say(table(["NAME", "DESCRIPTION"], [[g["name"], g["description"]] for g in view["groups"]]))
    return 0


def _cmd_history(args: argparse.Namespace) -> int:
    from moldd.audit.history import vm_history

    hist = vm_history(args.db, args.vm)
    if args.json:
        say(_dump(hist.to_dict()))
        return 0
    say(f"VM {hist.vm} (id {hist.id}, domain {hist.internal_name}): {len(hist.entries)} events")
    rows = []
    for e in hist.entries:
        who = e.actor if e.uid is None else f"uid={e.uid}" + (f"({e.user})" if e.user else "")
        change = "" if (e.state_before, e.power_before, e.host_before) == (e.state_after, e.power_after, e.host_after) else (
            ("(new)" if e.state_before is None else f"{e.state_before}/{e.power_before}@{e.host_before}")
            + f" -> {e.state_after}/{e.power_after}@{e.host_after}"
        )  # fmt: skip
        detail = " ".join(x for x in (e.summary, f"cause: {e.cause}" if e.cause else "") if x)
        rows.append(
            [e.position, e.at, e.kind, e.type, who, e.command_id or e.causation_id, e.host, change, detail]
        )
    say(
        table(
            ["POS", "TIME (UTC)", "KIND", "TYPE", "ACTOR", "COMMAND", "HOST", "STATE CHANGE", "DETAIL"], rows
        )
    )
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from moldd.audit.diff import live_diff

    res = live_diff(args.db, args.live, timeout=args.timeout)
    if args.json:
        say(_dump(res.to_dict()))
    else:
        say(
            f"log position {res.position}; hosts checked: {', '.join(res.hosts_checked) or 'none'}; "
            f"VMs checked: {res.vms_checked}"
        )
        if res.findings:
            say(
                table(
                    ["KIND", "VM", "DOMAIN", "HOST", "LOG SAYS", "HOST SAYS"],
                    [[f.kind, f.vm, f.domain, f.host, f.expected, f.actual] for f in res.findings],
                )
            )
        for s in res.skipped:
            say(f"skipped {s['vm']} ({s['state']}): {s['reason']}")
        say(
            "RESULT: DRIFT (exit 1)"
            if res.findings
            else "RESULT: NO DRIFT" + (" (exit 0)" if not res.host_errors else "")
        )
    for host, why in res.host_errors.items():
        say(f"{PROG}: could not check host {host}: {why}", file=sys.stderr)
    return res.exit_code


def _cmd_export(args: argparse.Namespace) -> int:
    from moldd.audit.export import export

    if args.output is None:
        export(args.db, args.format, sys.stdout, args.from_position, args.to_position)
        return 0
    out = Path(args.output)
    from events.verify import same_file

    if same_file(out, args.db):
        raise AuditError("--output is the log itself; refusing to overwrite the evidence", field="output")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            n = export(args.db, args.format, f, args.from_position, args.to_position)
        os.replace(tmp, out)
    except OSError as exc:
        raise AuditError(f"cannot write {out}: {exc.strerror}", field="output") from exc
    finally:
        tmp.unlink(missing_ok=True)
    say(f"{n} events written to {out}", file=sys.stderr)
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    from moldd.audit.checkpoint import keygen

    priv, pub = keygen(args.dir, args.name)
    say(f"private key: {priv} (mode 0600: give its path to [checkpoints] key; keep a copy off this host)")
    say(f"public key:  {pub} (for moldd-audit verify --public-key)")
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from moldd.audit.checkpoint import checkpoint

    cp, failed = checkpoint(args.db, args.key, args.out, check=not args.no_verify)
    if cp is None:
        if failed is None:
            raise AuditError("internal error: no checkpoint and no failure")
        say(failed.render(), file=sys.stderr)
        say(f"{PROG}: refusing to sign a log that does not verify", file=sys.stderr)
        return failed.exit_code
    say(f"checkpoint: log {cp.log_id} position {cp.position} head {cp.head_hash} at {cp.time}")
    return 0


COMMANDS = {
    "verify": _cmd_verify,
    "state": _cmd_state,
    "history": _cmd_history,
    "diff": _cmd_diff,
    "export": _cmd_export,
    "keygen": _cmd_keygen,
    "checkpoint": _cmd_checkpoint,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else EXIT_ERROR
    tmp = None
    try:
        if getattr(args, "db", None) is not None and str(args.db).startswith(("postgresql://", "postgres://")):
            # a log on PostgreSQL: the same tools run on a row-for-row copy in a temporary file
            from events.copy import materialise

            dsn = args.db
            path, tmp = materialise(dsn, args.schema)
            args.db = str(path)
            print(f"{PROG}: log {dsn} schema {args.schema} read into {path}", file=sys.stderr)
        return COMMANDS[args.command](args)
    except AuditError as exc:
        say(f"{PROG}: error: {exc.message}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # the reader (head, less) went away: not an error of the audit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        say(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # never a traceback for an auditor: one line, "could not check"
        say(f"{PROG}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
