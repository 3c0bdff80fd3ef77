"""A real, throw-away PostgreSQL server for tests and benchmarks (Debian's `postgresql` package).

`initdb` into a fresh directory and `pg_ctl start` as an unprivileged user (PostgreSQL refuses to run as
root; when we are not root we run it as ourselves), listening only on a Unix socket in that directory.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

RUN_AS = "nobody"


class PgServerError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The newest /usr/lib/postgresql/<version>/bin with initdb and pg_ctl (MOLDD_PG_BINDIR overrides)."""
    env = os.environ.get("MOLDD_PG_BINDIR")
    candidates = (
        [env]
        if env
        else sorted(
            glob.glob("/usr/lib/postgresql/*/bin"),
            key=lambda p: int(Path(p).parent.name.split(".")[0]),
            reverse=True,
        )
    )
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise PgServerError(
        "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: apt-get install postgresql "
        "(scripts/install.sh installs it)"
    )


class PgServer:
    """`with PgServer() as pg: pg.dsn()`; `pg.dsn(user=..., dbname=...)`; `pg.execute(sql)` as superuser."""

    def __init__(self, *, fsync: bool = True, settings: dict[str, str] | None = None) -> None:
        self.bindir = find_bindir()
        self.fsync = fsync
        self.settings = settings or {}
        self.dir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data = self.dir / "data"
        self.logfile = self.dir / "server.log"
        self.superuser = "postgres"
        self._user: pwd.struct_passwd | None = pwd.getpwnam(RUN_AS) if os.geteuid() == 0 else None

    # -- life cycle -------------------------------------------------------------------------------------
    def _run(self, args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "HOME": str(self.dir)}
        extra: dict[str, Any] = {}
        if self._user is not None:
            extra = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        return subprocess.run(args, env=env, cwd=self.dir, capture_output=True, text=True, **extra, **kw)

    def start(self) -> PgServer:
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.dir, 0o700)
        r = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                self.superuser,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            timeout=120,
        )
        if r.returncode != 0:
            raise PgServerError(f"initdb failed: {r.stderr.strip() or r.stdout.strip()}")
        conf = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.dir}'",
            "fsync": "on" if self.fsync else "off",
            "synchronous_commit": "on",
            "max_connections": "100",
            "shared_buffers": "64MB",
            "log_min_messages": "warning",
            **self.settings,
        }
        with open(self.data / "postgresql.conf", "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        r = self._pg_ctl_start()
        if r.returncode != 0:
            log = self.logfile.read_text() if self.logfile.exists() else ""
            raise PgServerError(f"pg_ctl start failed: {r.stderr.strip()} {log[-2000:]}")
        return self

    def _pg_ctl_start(self) -> subprocess.CompletedProcess[str]:
        """`pg_ctl start`, waiting up to 60 s for the server to accept connections."""
        return self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60", "start"],
            timeout=90,
        )

    def start_replica_of(self, primary: PgServer, name: str = "replica1") -> PgServer:
        """Start this (not yet started) server as a streaming replica of `primary` (pg_basebackup -R)."""
        if self._user is not None:
            os.chown(self.dir, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.dir, 0o700)
        r = self._run(
            [str(self.bindir / "pg_basebackup"), "-h", str(primary.dir), "-U", primary.superuser, "-D",
             str(self.data), "-R", "-X", "stream", "--no-sync"],
            timeout=300,
        )  # fmt: skip
        if r.returncode != 0:
            raise PgServerError(f"pg_basebackup failed: {r.stderr.strip()}")
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(f"unix_socket_directories = '{self.dir}'\ncluster_name = '{name}'\n")
            for k, v in self.settings.items():
                f.write(f"{k} = {v}\n")
        self.superuser = primary.superuser
        r = self._pg_ctl_start()
        if r.returncode != 0:
            raise PgServerError(f"pg_ctl start (replica) failed: {r.stderr.strip()}")
        return self

    def crash(self) -> None:
        """Stop at once without a checkpoint (`pg_ctl stop -m immediate`): what a power loss leaves."""
        self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"], timeout=60
        )

    def promote(self) -> None:
        r = self._run(
            [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "promote"], timeout=90
        )
        if r.returncode != 0:
            raise PgServerError(f"pg_ctl promote failed: {r.stderr.strip()}")

    def stop(self) -> None:
        if self.data.exists():
            self._run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                timeout=60,
            )
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use ------------------------------------------------------------------------------------------
    def dsn(self, dbname: str = "postgres", user: str | None = None, **params: str) -> str:
        query = "&".join([f"host={self.dir}", *(f"{k}={v}" for k, v in params.items())])
        return f"postgresql://{user or self.superuser}@/{dbname}?{query}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        r = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(self.dir),
                "-U",
                self.superuser,
                "-d",
                dbname,
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if r.returncode != 0:
            raise PgServerError(f"psql failed: {r.stderr.strip()}")
        return r.stdout.strip()

    def create_database(self, name: str) -> str:
        """A new empty database; returns its superuser DSN."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def wait_gone(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while (self.data / "postmaster.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
