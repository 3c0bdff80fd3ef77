"""Several real, independent libvirtd "hosts" on one machine.

Each :class:`LabHost` runs one ``libvirtd`` (monolithic daemon, started by hand: there is no systemd) in its
own private mount namespace::

    unshare -m --propagation private sh -c 'mount --bind <d>/etc /etc/libvirt; mount --bind <d>/run /run/libvirt;
        mount --bind <d>/lib /var/lib/libvirt; mount --bind <d>/cache /var/cache/libvirt;
        mount --bind <d>/log /var/log/libvirt; exec libvirtd --config <d>/libvirtd.conf --pid-file <d>/pid'

``/etc/libvirt`` as a whole is private (a copy of the machine's one, made once) so every host has its own
``qemu.conf`` (distinct ``migration_port_min/max``, ``remote_display_port_min/max``,
``remote_websocket_port_min/max``) and its own ``/etc/libvirt/qemu`` (persistent domain definitions).
``libvirtd.conf`` sets ``unix_sock_dir = <d>/run``, ``auth_unix_rw = "none"``, a distinct ``host_uuid``
and nothing else: without ``--listen`` libvirtd only listens on its unix sockets.  The socket is
``<d>/run/libvirt-sock``; the URI ``qemu+unix:///system?socket=<d>/run/libvirt-sock``.

Process identity (verified): ``sh`` ``exec``s libvirtd and ``unshare -m`` does not fork, so the
``Popen`` child *is* libvirtd (its pid equals the pid file content; SIGSTOP/SIGKILL hit libvirtd itself).
QEMU processes are daemonised by libvirt (their parent is not libvirtd) and their command line only
contains namespace-internal paths (``/var/lib/libvirt/qemu/domain-1-vm/...``, ``/run/libvirt/qemu/...``)
that are identical on every host, so neither the ppid nor the command line identifies the host.  A
process belongs to a host iff, *seen from its own mount namespace*, ``/run/libvirt`` is this host's
``<d>/run``: ``os.stat(f"/proc/{pid}/root/run/libvirt")`` has the same ``(st_dev, st_ino)`` as
``<d>/run``.  This survives reparenting after libvirtd is killed and libvirt's per-domain mount
namespaces (they are cloned from libvirtd's and keep its bind mounts).  See :func:`host_processes`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid as uuidlib
import weakref
from pathlib import Path
from types import TracebackType

from moldlab.setup import prepare_host

LIBVIRTD = "/usr/sbin/libvirtd"
PRIVATE_DIRS: dict[str, str] = {
    # private dir name -> path it is bind-mounted on, inside the host's mount namespace
    "etc": "/etc/libvirt",
    "run": "/run/libvirt",
    "lib": "/var/lib/libvirt",
    "cache": "/var/cache/libvirt",
    "log": "/var/log/libvirt",
}
MIGRATION_PORT_BASE = 49152
DISPLAY_PORT_BASE = 5900
WEBSOCKET_PORT_BASE = 11000
PORTS_PER_HOST = 50
TCP_PORT_BASE = 16600  # + the host's index: libvirtd's TCP listener of a lab host made with tcp=True
HOSTS_PER_SLOT = 8
SLOTS = 12  # labs that may run at once on one machine (each holds a slot lock while it lives)
SLOT_LOCK_DIR = Path("/tmp/moldd-lab-slots")


def claim_slot() -> tuple[int, int]:
    """A free lab slot and the open file descriptor whose lock holds it (closing it frees the slot). Labs of
    different processes (two test runs, the demo) then get disjoint VNC and migration port ranges."""
    import fcntl

    SLOT_LOCK_DIR.mkdir(parents=True, exist_ok=True)
    for slot in range(SLOTS):
        fd = os.open(SLOT_LOCK_DIR / f"{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return slot, fd
    raise LabError(f"all {SLOTS} lab slots are in use (locks in {SLOT_LOCK_DIR})")
HOST_INFO_FILE = "host.json"


class LabError(RuntimeError):
    """A lab host could not be started / stopped as asked."""


# --------------------------------------------------------------------------------------------------
# process identification (shared with moldlab.fence)


def _proc_comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _proc_state(pid: int) -> str:
    """One-letter state from /proc/<pid>/stat ('' if gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[0]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    return _proc_state(pid) not in ("", "Z", "X")


def _dir_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def host_processes(host_dir: Path) -> dict[int, str]:
    """All live processes (pid -> comm) whose ``/run/libvirt`` is ``<host_dir>/run``.

    That is this host's libvirtd and every QEMU it started (including ones left running after libvirtd
    was killed).  Zombies are ignored.
    """
    key = _dir_key(Path(host_dir) / "run")
    if key is None:
        return {}
    me = os.getpid()
    out: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        if pid == me:
            continue
        if _dir_key(Path(f"/proc/{pid}/root/run/libvirt")) != key:
            continue
        if not pid_alive(pid):
            continue
        out[pid] = _proc_comm(pid)
    return out


def _is_qemu(comm: str) -> bool:
    return comm.startswith("qemu-system") or comm.startswith("qemu-kvm") or comm.startswith("qemu")


def host_qemu_pids(host_dir: Path) -> list[int]:
    return sorted(pid for pid, comm in host_processes(host_dir).items() if _is_qemu(comm))


def host_libvirtd_pids(host_dir: Path) -> list[int]:
    return sorted(pid for pid, comm in host_processes(host_dir).items() if comm == "libvirtd")


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is alive; returns the survivors."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if pid_alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = [p for p in left if pid_alive(p)]
    return left


def kill_host_processes(host_dir: Path, *, qemu: bool = True, libvirtd: bool = False,
                        timeout: float = 5.0) -> tuple[int, list[int]]:
    """SIGKILL this host's qemu (and/or libvirtd) processes; returns (killed count, survivors)."""
    procs = host_processes(host_dir)
    targets = [p for p, c in procs.items() if (qemu and _is_qemu(c)) or (libvirtd and c == "libvirtd")]
    killed = [p for p in targets if _signal(p, signal.SIGKILL)]
    return len(killed), wait_gone(targets, timeout)


# --------------------------------------------------------------------------------------------------


def _tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path})"
    return "\n".join(lines[-n:])


class LabHost:
    """One libvirtd "host".  Create through :class:`Lab` (or directly: ``LabHost(name, dir, index)``)."""

    def __init__(self, name: str, dir: Path, index: int = 0, host_uuid: str | None = None,
                 start_timeout: float = 30.0, qemu_caps_seed: Path | None = None, tcp: bool = False) -> None:
        self.name = name
        # tcp: libvirtd also listens on 127.0.0.1:<tcp_port> (no auth, no TLS: a lab only) and ``uri`` is
        # ``qemu+tcp://``, so a frozen host is noticed by libvirt's keepalive on a TCP link, as in production
        self.tcp = tcp
        self.tcp_port = TCP_PORT_BASE + index
        self.qemu_caps_seed = qemu_caps_seed
        self.dir = Path(dir).resolve()
        self.index = index
        self.start_timeout = start_timeout
        info = self._load_info()
        self.host_uuid: str = host_uuid or info.get("host_uuid") or str(uuidlib.uuid4())
        self.migration_port_min = MIGRATION_PORT_BASE + PORTS_PER_HOST * index
        self.migration_port_max = self.migration_port_min + PORTS_PER_HOST - 1
        self.display_port_min = DISPLAY_PORT_BASE + PORTS_PER_HOST * index
        self.display_port_max = self.display_port_min + PORTS_PER_HOST - 1
        self.websocket_port_min = WEBSOCKET_PORT_BASE + PORTS_PER_HOST * index
        self.websocket_port_max = self.websocket_port_min + PORTS_PER_HOST - 1
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self._lock = threading.RLock()

    # ---- paths -----------------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        return self.dir / "run" / "libvirt-sock"

    @property
    def uri(self) -> str:
        if self.tcp:
            return f"qemu+tcp://127.0.0.1:{self.tcp_port}/system"
        return f"qemu+unix:///system?socket={self.socket_path}"

    @property
    def config_path(self) -> Path:
        return self.dir / "libvirtd.conf"

    @property
    def pid_path(self) -> Path:
        return self.dir / "pid"

    @property
    def log_path(self) -> Path:
        """libvirtd's own log (``log_outputs``); stdout/stderr go to :attr:`stderr_path`."""
        return self.dir / "log" / "libvirtd.log"

    @property
    def stderr_path(self) -> Path:
        return self.dir / "libvirtd.stderr"

    def qemu_log_path(self, domain: str) -> Path:
        """libvirt's per-domain QEMU log (``/var/log/libvirt/qemu/<domain>.log`` inside the host)."""
        return self.dir / "log" / "qemu" / f"{domain}.log"

    def migrate_uri(self, port: int | None = None) -> str:
        """A ``migrateuri`` for migrating *to* this host: ``tcp://127.0.0.1`` (the destination libvirtd
        then allocates a free port from its ``migration_port_min..max``: safe when several labs or
        migrations run at once), or ``tcp://127.0.0.1:<port>`` if ``port`` is given."""
        return "tcp://127.0.0.1" if port is None else f"tcp://127.0.0.1:{port}"

    def _load_info(self) -> dict[str, str]:
        try:
            data = json.loads((self.dir / HOST_INFO_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    # ---- setup -----------------------------------------------------------------------------------
    def _write_config(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in PRIVATE_DIRS:
            (self.dir / sub).mkdir(exist_ok=True)
        etc = self.dir / "etc"
        if not (etc / ".moldd-copied").exists():
            # private copy of the machine's /etc/libvirt (libvirt.conf, qemu.conf, qemu/ ...)
            shutil.copytree("/etc/libvirt", etc, dirs_exist_ok=True, symlinks=True)
            (etc / ".moldd-copied").write_text("")
        (etc / "qemu").mkdir(exist_ok=True)
        self._seed_qemu_caps()
        base = Path("/etc/libvirt/qemu.conf")
        base_text = base.read_text() if base.exists() else ""
        (etc / "qemu.conf").write_text(
            base_text.rstrip("\n")
            + f"\n\n# --- moldd lab host {self.name} (generated) ---\n"
            f"migration_port_min = {self.migration_port_min}\n"
            f"migration_port_max = {self.migration_port_max}\n"
            f"remote_display_port_min = {self.display_port_min}\n"
            f"remote_display_port_max = {self.display_port_max}\n"
            f"remote_websocket_port_min = {self.websocket_port_min}\n"
            f"remote_websocket_port_max = {self.websocket_port_max}\n"
        )
        self.config_path.write_text(
            f"# moldd lab host {self.name} (generated)\n"
            f'unix_sock_dir = "{self.dir / "run"}"\n'
            'unix_sock_group = "root"\n'
            'unix_sock_rw_perms = "0770"\n'
            'auth_unix_rw = "none"\n'
            'auth_unix_ro = "none"\n'
            f'host_uuid = "{self.host_uuid}"\n'
            f'log_outputs = "3:file:{self.log_path}"\n'
            "max_clients = 200\n"
            "max_workers = 40\n"
            + (
                "listen_tls = 0\nlisten_tcp = 1\n"
                f'listen_addr = "127.0.0.1"\ntcp_port = "{self.tcp_port}"\nauth_tcp = "none"\n'
                if self.tcp else ""
            )
        )
        info = {
            "name": self.name,
            "index": self.index,
            "host_uuid": self.host_uuid,
            "uri": self.uri,
            "migration_port_min": self.migration_port_min,
            "migration_port_max": self.migration_port_max,
        }
        (self.dir / HOST_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")

    @property
    def qemu_caps_dir(self) -> Path:
        """libvirt's QEMU capabilities cache (``/var/cache/libvirt/qemu/capabilities`` inside)."""
        return self.dir / "cache" / "qemu" / "capabilities"

    def _seed_qemu_caps(self) -> None:
        """Copy probed QEMU capabilities from the seed dir: probing takes ~4 s per host on the first
        domain start otherwise.  libvirtd validates the entries (binary ctime, versions, kernel) and
        re-probes if they are stale, so seeding is safe."""
        seed = self.qemu_caps_seed
        if seed is None or not seed.is_dir() or any(self.qemu_caps_dir.glob("*.xml")):
            return
        self.qemu_caps_dir.mkdir(parents=True, exist_ok=True)
        for f in seed.glob("*.xml"):
            shutil.copy2(f, self.qemu_caps_dir / f.name)

    def warm_up(self) -> None:
        """Make libvirtd probe QEMU now and store the result in the seed dir.

        ``getCapabilities()`` probes *every* emulator binary (~4 s each when not cached), not just the one
        a domain uses: the first ``getCapabilities()`` on an unseeded host is slow."""
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            conn.getCapabilities()  # probes every installed qemu-system-* binary (x86_64 and i386)
            conn.getDomainCapabilities(None, "x86_64", None, "qemu", 0)
        finally:
            conn.close()
        seed = self.qemu_caps_seed
        if seed is not None:
            seed.mkdir(parents=True, exist_ok=True)
            for f in self.qemu_caps_dir.glob("*.xml"):
                if not (seed / f.name).exists():
                    tmp = seed / (f.name + f".{os.getpid()}.tmp")
                    shutil.copy2(f, tmp)
                    tmp.replace(seed / f.name)

    def _script(self) -> str:
        binds = "; ".join(
            f"mkdir -p {target} && mount --bind {self.dir / sub} {target}"
            for sub, target in PRIVATE_DIRS.items()
        )
        listen = " --listen" if self.tcp else ""
        return f"set -e; {binds}; exec {LIBVIRTD}{listen} --config {self.config_path} --pid-file {self.pid_path}"

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start libvirtd and wait until ``libvirt.open(uri).getHostname()`` works."""
        import libvirt

        from moldlab.reaper import ensure_reaper

        ensure_reaper()

        with self._lock:
            if self.is_running():
                return
            # leftovers of an earlier run on the same dir (a crashed test session)
            stale = host_libvirtd_pids(self.dir)
            for pid in stale:
                _signal(pid, signal.SIGCONT)
                _signal(pid, signal.SIGKILL)
            wait_gone(stale, 5)
            self._write_config()
            with contextlib.suppress(FileNotFoundError):
                self.pid_path.unlink()
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()
            errf = open(self.stderr_path, "ab")
            try:
                self._proc = subprocess.Popen(
                    ["unshare", "-m", "--propagation", "private", "sh", "-c", self._script()],
                    stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                    start_new_session=True,  # Ctrl-C in the terminal must not hit the daemons
                    close_fds=True,
                )
            finally:
                errf.close()
            self.pid = self._proc.pid
            deadline = time.monotonic() + self.start_timeout
            last_err = "socket not there yet"
            while True:
                if self._proc.poll() is not None:
                    raise LabError(self._failure(f"libvirtd exited with {self._proc.returncode}"))
                if time.monotonic() > deadline:
                    self._force_stop()
                    raise LabError(self._failure(f"not ready after {self.start_timeout:.0f}s: {last_err}"))
                if self.socket_path.exists():
                    try:
                        conn = libvirt.open(self.uri)
                        try:
                            conn.getHostname()
                        finally:
                            conn.close()
                        break
                    except libvirt.libvirtError as e:
                        last_err = str(e)
                time.sleep(0.05)
            pid_from_file = self._read_pid_file()
            if pid_from_file is not None and pid_from_file != self._proc.pid:
                # not expected (sh execs libvirtd), but trust the pid file if it ever differs
                self.pid = pid_from_file

    def _read_pid_file(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _failure(self, what: str) -> str:
        return (
            f"lab host {self.name} ({self.dir}): {what}\n"
            f"--- {self.stderr_path} ---\n{_tail(self.stderr_path)}\n"
            f"--- {self.log_path} ---\n{_tail(self.log_path)}"
        )

    def is_running(self) -> bool:
        """libvirtd process exists (possibly frozen)."""
        if self._proc is not None and self._proc.poll() is not None:
            return False
        return self.pid is not None and pid_alive(self.pid)

    def _reap(self, timeout: float) -> bool:
        if self._proc is None:
            return self.pid is None or not pid_alive(self.pid)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def wipe(self) -> None:
        """Destroy and undefine every domain of this host, snapshot metadata included."""
        import libvirt

        conn = libvirt.open(self.uri)
        try:
            for dom in conn.listAllDomains(0):
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    for snap in dom.listAllSnapshots(0):
                        snap.delete(libvirt.VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY)
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                    )
        finally:
            conn.close()

    def qemu_pids(self) -> list[int]:
        """Live QEMU processes of this host (also those orphaned after libvirtd died)."""
        return host_qemu_pids(self.dir)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop: QEMUs get SIGTERM (then SIGKILL), then libvirtd SIGTERM (then SIGKILL).

        Leaves no process of this host behind.
        """
        with self._lock:
            if self.pid is not None:
                _signal(self.pid, signal.SIGCONT)  # in case it is frozen
            qemus = self.qemu_pids()
            for p in qemus:
                _signal(p, signal.SIGTERM)
            for p in wait_gone(qemus, 3):
                _signal(p, signal.SIGKILL)
            wait_gone(qemus, 3)
            if self.pid is not None and self.is_running():
                _signal(self.pid, signal.SIGTERM)
                if not self._reap(timeout):
                    _signal(self.pid, signal.SIGKILL)
                    self._reap(5)
            self._force_stop()

    def _force_stop(self) -> None:
        """SIGKILL everything left of this host and reap libvirtd."""
        if self.pid is not None:
            _signal(self.pid, signal.SIGCONT)
            _signal(self.pid, signal.SIGKILL)
            self._reap(5)
        _, survivors = kill_host_processes(self.dir, qemu=True, libvirtd=True)
        if survivors:
            raise LabError(f"lab host {self.name}: processes survive SIGKILL: {survivors}")
        self._proc = None
        self.pid = None

    def kill(self) -> None:
        """Host power loss: SIGKILL libvirtd and all its QEMUs (at once, no clean-up by libvirt)."""
        with self._lock:
            pids = list(self.qemu_pids())
            if self.pid is not None:
                pids.insert(0, self.pid)
                _signal(self.pid, signal.SIGKILL)
            for p in pids[1:] if self.pid is not None else pids:
                _signal(p, signal.SIGKILL)
            self._reap(5)
            wait_gone(pids, 5)
            self._force_stop()

    def kill_daemon(self) -> None:
        """SIGKILL libvirtd only (a libvirtd crash): its QEMUs keep running, and :meth:`restart`
        reconnects to them (same private dirs: status XML and monitor sockets survive)."""
        with self._lock:
            if self.pid is not None:
                _signal(self.pid, signal.SIGCONT)
                _signal(self.pid, signal.SIGKILL)
                self._reap(5)
                wait_gone([self.pid], 5)
            self._proc = None
            self.pid = None

    def freeze(self) -> None:
        """SIGSTOP libvirtd only (its guests keep running): looks like a network partition."""
        if self.pid is None or not self.is_running():
            raise LabError(f"lab host {self.name} is not running")
        _signal(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not self.is_frozen() and time.monotonic() < deadline:  # SIGSTOP is delivered asynchronously
            time.sleep(0.005)

    def thaw(self) -> None:
        """SIGCONT libvirtd."""
        if self.pid is not None:
            _signal(self.pid, signal.SIGCONT)

    def is_frozen(self) -> bool:
        return self.pid is not None and _proc_state(self.pid) == "T"

    def fence(self) -> int:
        """Kill this host's QEMU processes (an IPMI power-off, seen from the guests); returns how many.

        libvirtd stays up and reports STOPPED/FAILED for each killed guest.
        """
        killed, survivors = kill_host_processes(self.dir, qemu=True, libvirtd=False)
        if survivors:
            raise LabError(f"lab host {self.name}: qemu processes survive SIGKILL: {survivors}")
        return killed

    def restart(self) -> None:
        """Start libvirtd again (after :meth:`kill` or :meth:`stop`), keeping its private dirs."""
        with self._lock:
            if self.is_running():
                self.stop()
            self._proc = None
            self.pid = None
            self.start()

    def __repr__(self) -> str:
        return f"LabHost(name={self.name!r}, pid={self.pid}, uri={self.uri!r})"


_live_labs: weakref.WeakSet[Lab] = weakref.WeakSet()


@atexit.register
def _stop_live_labs() -> None:
    for lab in list(_live_labs):
        with contextlib.suppress(Exception):
            lab.stop()


class Lab:
    """``n_hosts`` libvirtd hosts under ``root`` (``root/<prefix><i>``).  Context manager."""

    def __init__(self, root: Path, n_hosts: int = 2, name_prefix: str = "host",
                 prepare: bool = True, qemu_caps_cache: Path | None = None, tcp: bool = False) -> None:
        self.root = Path(root).resolve()
        # probed QEMU capabilities shared by the hosts (pass a persistent dir to reuse across runs)
        self.qemu_caps_cache = Path(qemu_caps_cache).resolve() if qemu_caps_cache else self.root / "qemu-caps"
        self.n_hosts = n_hosts
        self.name_prefix = name_prefix
        self.prepare = prepare
        if n_hosts > HOSTS_PER_SLOT:
            raise LabError(f"a lab has at most {HOSTS_PER_SLOT} hosts")
        self.slot, self._slot_fd = claim_slot()
        self.hosts: list[LabHost] = [
            LabHost(f"{name_prefix}{i}", self.root / f"{name_prefix}{i}", index=self.slot * HOSTS_PER_SLOT + i,
                    qemu_caps_seed=self.qemu_caps_cache, tcp=tcp)
            for i in range(n_hosts)
        ]

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def start(self) -> Lab:
        if self.prepare:
            prepare_host()
        self.root.mkdir(parents=True, exist_ok=True)
        _live_labs.add(self)
        try:
            for i, h in enumerate(self.hosts):
                if not h.is_running():  # leftovers of a crashed earlier run on the same dirs
                    kill_host_processes(h.dir, qemu=True, libvirtd=True)
                h.start()
                if i == 0:
                    h.warm_up()  # probe QEMU once; the other hosts start from the seeded cache
        except BaseException:
            self.stop()
            raise
        return self

    def heal(self, *, wipe: bool = False) -> None:
        """Every host thawed and running again, with no guests left (what a test leaves behind); with ``wipe``
        also no domain definitions (nor their snapshot metadata)."""
        for h in self.hosts:
            if h.is_frozen():
                h.thaw()
            if not h.is_running():
                h.restart()
            h.fence()
            if wipe:
                h.wipe()

    def stop(self) -> None:
        """Stop every host; no libvirtd or qemu of this lab is left afterwards."""
        errors: list[BaseException] = []
        for h in self.hosts:
            try:
                h.stop()
            except Exception as e:
                errors.append(e)
        _live_labs.discard(self)
        if self._slot_fd >= 0:
            os.close(self._slot_fd)  # frees the slot (its port ranges) for another lab
            self._slot_fd = -1
        if errors:
            raise LabError("; ".join(str(e) for e in errors))

    def describe(self) -> dict[str, object]:
        return {
            "root": str(self.root),
            "hosts": [
                {"name": h.name, "uri": h.uri, "dir": str(h.dir), "pid": h.pid, "host_uuid": h.host_uuid,
                 "migration_port_min": h.migration_port_min, "migration_port_max": h.migration_port_max}
                for h in self.hosts
            ],
        }

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
