"""Command line: python -m events verify|keygen|checkpoint ...  (exit 0 ok, 1 tampered, 2 could not check)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .checkpoint import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, checkpoint_db, generate_keys, load_private_key
from .errors import EventLogError
from .verify import verify


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m events", description="Tamper-evident event log tools")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="check a log's chain, gaps and checkpoints")
    v.add_argument("db")
    v.add_argument("--checkpoints", help="JSON-lines file of signed checkpoints")
    v.add_argument("--public-key", help="PEM public key that signed the checkpoints")
    v.add_argument("--json", action="store_true", help="print the report as JSON")
    v.add_argument("--schema", default="events", help="PostgreSQL schema when DB is a postgresql:// DSN")
    cp = sub.add_parser("copy", help="copy a log row for row (SQLite file <-> postgresql:// DSN), then check it")
    cp.add_argument("src")
    cp.add_argument("dst", help="a new file, or a DSN whose schema holds no events yet")
    cp.add_argument("--src-schema", default="events")
    cp.add_argument("--dst-schema", default="events")
    pi = sub.add_parser("pg-init", help="create the log's schema in PostgreSQL (as its owner) and grant a role")
    pi.add_argument("dsn")
    pi.add_argument("--schema", default="events")
    pi.add_argument("--grant", metavar="ROLE", help="the daemon's role: SELECT+INSERT only (no UPDATE/DELETE)")
    k = sub.add_parser("keygen", help=f"write {PRIVATE_KEY_NAME} (0600) and {PUBLIC_KEY_NAME} in DIR")
    k.add_argument("dir")
    c = sub.add_parser("checkpoint", help="verify the log, then sign its head and append it to --out")
    c.add_argument("db")
    c.add_argument("--key", required=True, help="PEM Ed25519 private key")
    c.add_argument("--out", required=True, help="checkpoints file (JSON lines, appended)")
    c.add_argument("--no-verify", action="store_true", help="sign without checking the log first")
    c.add_argument("--schema", default="events", help="PostgreSQL schema when DB is a postgresql:// DSN")
    return p


def _checkpoint(db: str, args: argparse.Namespace) -> int:
    """Verify the log file `db` (against --out's earlier checkpoints), then sign its head into --out."""
    from .verify import same_file

    if same_file(args.out, db):
        print(f"error: --out {args.out} is the log itself: refusing to write into the evidence", file=sys.stderr)
        return 2
    key = load_private_key(args.key)
    if not args.no_verify:
        from pathlib import Path

        out = Path(args.out)
        report = verify(
            db,
            checkpoints=args.out if out.exists() else None,
            public_key=key.public_key() if out.exists() else None,
        )
        if not report.ok:
            print(report.render(), file=sys.stderr)
            print("refusing to sign a log that does not verify", file=sys.stderr)
            return int(report.exit_code)
    cp = checkpoint_db(db, key, args.out)
    print(f"checkpoint: log {cp.log_id} position {cp.position} head {cp.head_hash} at {cp.time}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are "could not check"
        return 0 if exc.code == 0 else 2
    try:
        if args.command == "verify":
            from .copy import verify_target

            report = verify_target(
                args.db, schema=args.schema, checkpoints=args.checkpoints, public_key=args.public_key
            )
            print(json.dumps(report.to_dict(), indent=2) if args.json else report.render())
            return int(report.exit_code)
        if args.command == "copy":
            import asyncio

            from .copy import async_copy

            log_id, position, head = asyncio.run(
                async_copy(args.src, args.dst, src_schema=args.src_schema, dst_schema=args.dst_schema)
            )
            print(f"copied log {log_id}: {position} events, head {head.hex()} (verified at the destination)")
            return 0
        if args.command == "pg-init":
            import asyncio

            from .postgres import async_pg_init

            log_id, statements = asyncio.run(async_pg_init(args.dsn, args.schema, args.grant))
            print(f"log {log_id} in schema {args.schema}")
            for stmt in statements:
                print(f"{stmt};")
            return 0
        if args.command == "keygen":
            priv, pub = generate_keys(args.dir)
            print(f"private key: {priv} (mode 0600; ship the public key and the checkpoints off the host)")
            print(f"public key:  {pub}")
            return 0
        if args.command == "checkpoint":
            from .postgres import is_dsn

            if not is_dsn(args.db):
                return _checkpoint(args.db, args)
            from .copy import materialise

            path, tmp = materialise(args.db, args.schema)  # a log in PostgreSQL: checked and signed on a copy
            try:
                return _checkpoint(str(path), args)
            finally:
                if tmp is not None:
                    tmp.cleanup()
    except EventLogError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except Exception as exc:  # never a traceback: report and say we could not check
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
