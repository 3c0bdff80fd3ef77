"""Shared pytest fixtures.  Lab fixtures (real libvirtd + QEMU): see moldlab.

* ``libvirt_events``: libvirt's default event loop, registered once per session, run in a thread
  (needed for domain events and connection keepalive; must precede the connections that use them).
* ``guest_image``: the tiny real Linux guest, cached in ``$MOLDD_LAB_CACHE`` or ``<repo>/.lab/cache``.
* ``lab``: 2 lab hosts for the whole session (stopped at the end); a test that kills/freezes a host
  must leave it running again (``lab_healthy`` does that after each test that uses it).
* ``wait_events`` / :class:`moldlab.events.LifecycleRecorder`: wait for lifecycle events.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _import_real_libvirt() -> None:
    """pytest (rootdir/prepend import mode) puts ``tests/`` on sys.path for this conftest; a
    ``tests/<name>/__init__.py`` then shadows the top-level module ``<name>`` (``tests/libvirt/`` would
    shadow libvirt-python, ``tests/events/`` the ``events`` package).  Import the real libvirt first.
    Test packages must not be named like importable modules (or need ``tests/__init__.py``)."""
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != TESTS]
    try:
        import libvirt  # noqa: F401
    except ImportError:
        pass
    finally:
        sys.path[:] = saved


_import_real_libvirt()

from moldlab import GuestImage, Lab  # noqa: E402  (after the real libvirt is in sys.modules)


def lab_cache_dir() -> Path:
    return Path(os.environ.get("MOLDD_LAB_CACHE") or REPO / ".lab" / "cache")


@pytest.fixture(scope="session")
def libvirt_events() -> None:
    from moldlab.events import ensure_default_event_loop

    ensure_default_event_loop()


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    from moldlab import build_guest

    return build_guest(lab_cache_dir())


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory, libvirt_events: None) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("lab")
    the_lab = Lab(root, n_hosts=2, qemu_caps_cache=lab_cache_dir() / "qemu-caps")
    the_lab.start()
    try:
        yield the_lab
    finally:
        the_lab.stop()


@pytest.fixture
def lab_healthy(lab: Lab) -> Iterator[Lab]:
    """The session lab; after the test every host is thawed and running, without guests."""
    yield lab
    lab.heal()


@pytest.fixture
def wait_events() -> Callable[..., list[tuple[int, int]]]:
    """``wait_events(recorder, domain_name, (event, detail), timeout=30)`` -> that domain's events."""

    def wait(recorder: Any, name: str, pair: tuple[int, int], timeout: float = 30.0) -> list[tuple[int, int]]:
        result: list[tuple[int, int]] = recorder.wait_for(name, pair, timeout)
        return result

    return wait


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """A real PostgreSQL server for the session (moldlab.testing.pgserver: initdb + pg_ctl as `nobody`, Unix
    socket in its own temporary directory). fsync is off: tests check behaviour, not power-loss durability."""
    from moldlab.testing.pgserver import PgServer

    with PgServer(fsync=False) as pg:
        yield pg
