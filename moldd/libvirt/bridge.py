"""The thread/loop bridge: libvirt's own event loop in one thread, blocking calls in worker pools.

libvirt-python calls block (every API call is an RPC round trip, a frozen host makes it hang until the
keepalive gives up), so the asyncio loop never calls libvirt directly.  Instead:

* libvirt's default event-loop implementation runs forever in one daemon thread per process
  (``virEventRegisterDefaultImpl`` must happen before the first connection is opened, or keepalive and
  domain events never fire);
* blocking calls run in worker threads.  Pools are keyed (one per host, by convention) so a host whose
  calls are stuck cannot starve the others, and each key has a separate small pool for long operations
  (migration, snapshots with memory) so they cannot starve short ones;
* libvirt errors are translated into moldd errors here, once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import libvirt

from moldd.domain.errors import MolddError, NotFound, OperationFailed, Unavailable

T = TypeVar("T")

_event_thread: threading.Thread | None = None
_event_lock = threading.Lock()

# Error codes meaning "the host or the connection is gone", not "the operation was refused".
_UNAVAILABLE_CODES = frozenset({libvirt.VIR_ERR_NO_CONNECT, libvirt.VIR_ERR_INVALID_CONN})
# Transport-level failures ("Cannot write data: Broken pipe", "client socket is closed", "connection closed
# due to keepalive timeout") come from the RPC layer; the same codes from a driver mean a refusal.
_UNAVAILABLE_DOMAINS = frozenset({libvirt.VIR_FROM_RPC, libvirt.VIR_FROM_REMOTE})
_TRANSPORT_CODES = frozenset(
    {libvirt.VIR_ERR_RPC, libvirt.VIR_ERR_SYSTEM_ERROR, libvirt.VIR_ERR_INTERNAL_ERROR}
)
_NOT_FOUND_CODES = frozenset(
    {
        libvirt.VIR_ERR_NO_DOMAIN,
        libvirt.VIR_ERR_NO_DOMAIN_SNAPSHOT,
    }
)


EVENT_THREAD_NAME = "libvirt-event-loop"


def ensure_event_loop_thread() -> None:
    """Register libvirt's default event loop and start its thread; once per process, idempotent.

    There is only one event implementation per process and libvirt refuses to run it from two threads,
    so a thread already running it under :data:`EVENT_THREAD_NAME` (started by other code in the same
    process, e.g. the lab harness) is adopted instead of registering again.
    """
    global _event_thread
    with _event_lock:
        # libvirt prints every error to stderr unless a handler is registered; we raise them instead.
        libvirt.registerErrorHandler(_ignore_error, None)
        if _event_thread is not None and _event_thread.is_alive():
            return
        for t in threading.enumerate():
            if t.name == EVENT_THREAD_NAME and t.is_alive():
                _event_thread = t
                return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            pause = threading.Event()
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except libvirt.libvirtError:  # pragma: no cover - defensive: never spin on an error
                    pause.wait(0.1)

        _event_thread = threading.Thread(target=run, name=EVENT_THREAD_NAME, daemon=True)
        _event_thread.start()


def _ignore_error(_ctx: object, _err: object) -> None:
    return None


def translate_error(exc: libvirt.libvirtError, *, what: str = "") -> MolddError:
    """Map a libvirtError to the moldd error a client can act on, keeping libvirt's message."""
    code = exc.get_error_code()
    domain = exc.get_error_domain()
    message = exc.get_error_message() or str(exc)
    if what:
        message = f"{what}: {message}"
    if code in _NOT_FOUND_CODES:
        return NotFound(message, code="not_found")
    if code in _UNAVAILABLE_CODES or (domain in _UNAVAILABLE_DOMAINS and code in _TRANSPORT_CODES):
        return Unavailable(message)
    return OperationFailed(message)


UNGATED = frozenset({"_close_conn"})
"""Calls a fenced node may still make: releasing its own connections."""


class LibvirtBridge:
    """Runs blocking libvirt calls off the loop; owns the worker pools.

    ``async_call(fn, *args, pool="h1", long=False, timeout=30)`` runs ``fn(*args)`` in the short (or long)
    pool of ``pool``.  A call that exceeds ``timeout`` raises :class:`Unavailable`; its thread cannot be
    interrupted and finishes whenever libvirt returns (the keepalive bounds that for a frozen host).
    """

    def __init__(
        self,
        *,
        short_workers: int = 6,
        long_workers: int = 2,
        default_timeout: float = 30.0,
    ) -> None:
        self._short_workers = short_workers
        self._long_workers = long_workers
        self.default_timeout = default_timeout
        self._pools: dict[tuple[str, bool], ThreadPoolExecutor] = {}
        self._lock = threading.Lock()
        self._closed = False
        # cluster mode: checked before every call (except closing a connection); false = this node must not
        # touch libvirt (a deposed leader, a standby)
        self.gate: Callable[[], bool] | None = None

    def start(self) -> None:
        """Start the process-wide libvirt event loop thread (idempotent)."""
        ensure_event_loop_thread()

    def _pool(self, key: str, long: bool) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise Unavailable("the libvirt bridge is shut down")
            pool = self._pools.get((key, long))
            if pool is None:
                pool = ThreadPoolExecutor(
                    max_workers=self._long_workers if long else self._short_workers,
                    thread_name_prefix=f"libvirt-{key}-{'long' if long else 'short'}",
                )
                self._pools[(key, long)] = pool
            return pool

    def submit(
        self, fn: Callable[..., T], *args: Any, pool: str = "default", long: bool = False
    ) -> asyncio.Future[T]:
        """Start ``fn(*args)`` in a worker; the returned future is not cancelled on timeout by anyone."""
        return asyncio.wrap_future(self._submit(fn, *args, pool=pool, long=long))

    def _submit(
        self, fn: Callable[..., T], *args: Any, pool: str = "default", long: bool = False
    ) -> concurrent.futures.Future[T]:
        gate = self.gate
        if gate is not None and not gate() and getattr(fn, "__name__", "") not in UNGATED:
            raise Unavailable("this moldd is not the cluster leader (fenced): no libvirt calls", code="not_leader")
        return self._pool(pool, long).submit(functools.partial(fn, *args))

    async def async_call(
        self,
        fn: Callable[..., T],
        *args: Any,
        long: bool = False,
        pool: str = "default",
        timeout: float | None = -1.0,
        what: str = "",
    ) -> T:
        """Run ``fn(*args)`` in a worker thread; libvirt errors come back as moldd errors.

        ``timeout=-1`` means the bridge default, ``None`` means wait forever (long operations that report
        their own progress).
        """
        if timeout is not None and timeout < 0:
            timeout = None if long else self.default_timeout
        work = self._submit(fn, *args, pool=pool, long=long)
        fut = asyncio.wrap_future(work)
        try:
            if timeout is None:
                return await fut
            # shield: a timeout must not try to cancel the thread (it cannot); the result is dropped.
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            fut.add_done_callback(_swallow)
            name = what or getattr(fn, "__name__", "libvirt call")
            # Still queued behind stuck workers (a frozen host): drop it, or the operation the caller was
            # told failed would run whenever a worker frees up. cancel() is atomic with the worker's pick-up.
            if work.cancel():
                raise Unavailable(
                    f"{name} did not start within {timeout:g} s (every worker of {pool!r} is busy)"
                ) from None
            raise Unavailable(f"{name} did not answer within {timeout:g} s") from None
        except libvirt.libvirtError as exc:
            raise translate_error(exc, what=what) from exc

    def shutdown(self, *, wait: bool = False) -> None:
        """Stop accepting calls; threads stuck in a frozen host are abandoned (they are daemon-like)."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.shutdown(wait=wait, cancel_futures=True)


def _swallow(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
