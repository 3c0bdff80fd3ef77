"""Read-only routes for operators, mounted on the API application (same listener, same identity check):

* ``GET /metrics`` — Prometheus text exposition (:mod:`moldd.observe.metrics`).
* ``GET /status`` — the live status page (``static/index.html`` + ``status.css`` + ``status.js``: no build
  step, nothing fetched from elsewhere).
* ``GET /v1/status[?page=N&pagesize=M]`` — one JSON document with clusters (headroom), hosts (health, link),
  jobs (in progress, with their progress; the last finished ones) and a page of VMs (state, power, HA; in id
  order, ``STATUS_PAGE_SIZE`` by default, ``pagesize=0`` for none) with ``vm_count``, the number of VMs.
* ``GET /v1/events/sse?from=N`` — the log as Server-Sent Events: ``id:`` is the log position, so a browser's
  ``EventSource`` resumes after a dropped connection (``Last-Event-ID``) without a gap or a duplicate. Live
  entries come from the projection (:class:`StatusFeed`), each with the state it produced: the VM, host and
  job as they were right after that entry was folded. The page shows every state a VM passes through
  (Stopped → Starting → Running), however quickly, in log order.

:func:`add_routes` mounts them on any ``aiohttp`` application whose ``BUS_KEY`` is the daemon's ``App``
(the CloudStack TCP listener can call it too).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import structlog
from aiohttp import web

from moldd.api.envelope import MAX_POSITION
from moldd.api.handlers import dumps, json_response
from moldd.api.keys import BUS_KEY, CLOSING_KEY, SETTINGS_KEY
from moldd.domain.errors import ValidationError
from moldd.observe.metrics import CONTENT_TYPE_LATEST, Metrics, cluster_capacities, host_counts

log = structlog.get_logger("moldd.observe")

METRICS_KEY = web.AppKey("moldd.metrics", Metrics)

STATIC = {
    "index.html": "text/html",
    "status.css": "text/css",
    "status.js": "text/javascript",
}
# The page may load only what it ships: no inline script, no other origin.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
RECENT_JOBS = 20
JOB_FIELDS = (
    "id", "command", "vm", "status", "state", "progress", "created_at", "updated_at", "finished_at", "error",
    "position",
)  # fmt: skip


def add_routes(app: web.Application, metrics: Metrics | None) -> None:
    """Mount the operator routes on ``app`` (``/metrics`` only when ``metrics`` is given)."""
    if metrics is not None:
        app[METRICS_KEY] = metrics
        app.router.add_get("/metrics", async_metrics)
    app.router.add_get("/status", async_page)
    app.router.add_get("/status/", async_page)
    app.router.add_get("/status/{name}", async_static)
    app.router.add_get("/v1/status", async_status)
    app.router.add_get("/v1/events/sse", async_events_sse)
    app.cleanup_ctx.append(_feed_ctx)


async def async_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``. Rendered on the loop: a scrape reads in-memory counters and one pass over the read
    model, cheaper than a hop to a thread."""
    body = request.app[METRICS_KEY].exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


def metrics_route(metrics: Metrics, token: str | None) -> Any:
    """A ``GET /metrics`` handler for a listener without peer credentials (a TCP one): with ``token`` it asks
    for ``Authorization: Bearer <token>`` (Prometheus: ``authorization: {credentials_file: ...}``), compared in
    constant time; ``None`` serves anyone who reaches the listener (only for a loopback or firewalled bind)."""
    expected = f"Bearer {token}".encode() if token is not None else None

    async def async_handler(request: web.Request) -> web.Response:
        if expected is not None:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                resp = web.json_response(
                    {"ok": False, "error": {"code": "permission_denied", "field": "Authorization",
                                            "message": "GET /metrics needs 'Authorization: Bearer <token>'"}},
                    status=401,
                )  # fmt: skip
                resp.headers["WWW-Authenticate"] = 'Bearer realm="moldd metrics"'
                return resp
        resp = web.Response(body=metrics.exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    return async_handler


def _static_bytes(name: str) -> bytes:
    return resources.files("moldd.observe").joinpath("static", name).read_bytes()


async def async_page(request: web.Request) -> web.Response:
    return _static_response("index.html")


async def async_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound(reason=f"no such file {name[:60]!r} in the status page")
    return _static_response(name)


def _static_response(name: str) -> web.Response:
    resp = web.Response(body=_static_bytes(name), content_type=STATIC[name], charset="utf-8")
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Cache-Control"] = "no-cache"
    return resp


STATUS_PAGE_SIZE = 500
"""VMs in a ``/v1/status`` reply unless ``pagesize`` says otherwise (10,000 VMs are ~6 MB of JSON)."""
MAX_STATUS_PAGE_SIZE = 10_000


def parse_status_query(query: Any) -> tuple[int, int]:
    """``GET /v1/status?page=N&pagesize=M``: the page of VMs (from 1) and its size (0 = no VMs, only
    ``vm_count``). Plain digits only; anything else is refused naming the parameter."""
    unknown = sorted(set(query) - {"page", "pagesize"})
    if unknown:
        raise ValidationError(
            f"unexpected query parameter {unknown[0]!r}; allowed: page, pagesize", field=unknown[0]
        )
    values = {"page": (1, 1, 1_000_000), "pagesize": (STATUS_PAGE_SIZE, 0, MAX_STATUS_PAGE_SIZE)}
    out = []
    for name, (default, low, high) in values.items():
        raw = query.get(name)
        if raw is None:
            out.append(default)
            continue
        value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 8 else -1
        if not low <= value <= high:
            raise ValidationError(f"{name} must be an integer from {low} to {high}, not {raw[:40]!r}", field=name)
        out.append(value)
    return out[0], out[1]


def status_document(bus: Any, page: int = 1, pagesize: int | None = None) -> dict[str, Any]:
    """What the page shows, from the read model as it is now: clusters, hosts and jobs whole, the VMs (in id
    order, without expunged ones) a page at a time: ``vm_count`` of them in all, ``pagesize`` from page
    ``page`` here (``None``: every VM)."""
    model = bus.model
    config = bus.config
    counts = host_counts(model)
    hosts = [v for h in config.hosts if (v := host_status(config, model, h.name, counts)) is not None]
    listed = model.vms_listed()  # in id order, cached by the read model: a page costs its slice
    shown = listed if pagesize is None else listed[(page - 1) * pagesize : page * pagesize]
    vms = [vm_status(vm) for vm in shown]
    active: list[Any] = []
    finished: list[Any] = []
    for job in model.jobs.values():
        (active if job.status in ("pending", "running") else finished).append(job)
    finished.sort(key=lambda j: j.position)
    jobs = [job_status(j) for j in [*active, *finished[-RECENT_JOBS:]]]
    return {
        "position": model.position,
        "generated_at": round(time.time(), 3),
        "health": bus.health(),
        "clusters": [
            c.to_dict()
            | {
                "hosts_up": sum(
                    1
                    for h in hosts
                    if h["cluster"] == c.cluster and h["health"] == "Up" and h["link"] == "connected"
                )
            }
            for c in cluster_capacities(config, model, counts[0])
        ],
        "hosts": hosts,
        "vm_count": len(listed),
        "page": page,
        "pagesize": pagesize,
        "vms": vms,
        "jobs": jobs,
    }


async def async_status(request: web.Request) -> web.Response:
    """``GET /v1/status[?page=N&pagesize=M]``: a page of VMs (``STATUS_PAGE_SIZE`` by default)."""
    page, pagesize = parse_status_query(request.query)
    return json_response({"ok": True, "result": status_document(request.app[BUS_KEY], page, pagesize)})


def _from_position(request: web.Request) -> int:
    """``Last-Event-ID`` (a reconnecting ``EventSource``) wins over ``?from=``: resume after what was seen."""
    last = request.headers.get("Last-Event-ID")
    if last is not None and last.isascii() and last.isdigit() and int(last) < MAX_POSITION:
        return int(last) + 1
    unknown = sorted(set(request.query) - {"from"})
    if unknown:
        raise ValidationError(f"unexpected query parameter {unknown[0]!r}; allowed: from", field=unknown[0])
    raw = request.query.get("from", "1")
    value = int(raw) if raw.isascii() and raw.isdigit() else -1
    if not 0 <= value <= MAX_POSITION:
        raise ValidationError(
            f'"from" must be a log position (an integer from 0 to {MAX_POSITION}), not {raw[:40]!r}',
            field="from",
        )
    return max(value, 1)


def sse_frame(data: dict[str, Any]) -> bytes:
    """One message: ``id`` = the entry's log position; one ``data`` line (JSON holds no raw newline)."""
    return b"id: %d\nevent: entry\ndata: %s\n\n" % (data["entry"]["position"], dumps(data))


def vm_status(vm: Any) -> Any:
    """The VM's cached read-model view (what ``listVirtualMachines`` shows): built once per change, and its
    JSON encoding is cached with it, so a status document of 10,000 VMs mostly splices cached bytes."""
    return vm.view()


def job_status(job: Any) -> dict[str, Any]:
    return {k: getattr(job, k, None) for k in JOB_FIELDS}


def host_status(
    config: Any, model: Any, name: str, counts: tuple[dict[str, int], dict[str, int]] | None = None
) -> dict[str, Any] | None:
    """A host as the page shows it; ``counts`` (from :func:`host_counts`) saves a scan of every VM."""
    h = config.host(name)
    if h is None:
        return None
    state = model.hosts.get(name)
    placed, running = counts if counts is not None else host_counts(model)
    return {
        "name": h.name,
        "cluster": h.cluster,
        "max_vms": h.max_vms,
        "health": state.health if state else "Up",
        "health_since": state.health_since if state else "",
        "health_cause": state.health_cause if state else "",
        "link": state.link if state else "unknown",
        "link_since": state.link_since if state else "",
        "vms": placed.get(name, 0),
        "running": running.get(name, 0),
    }


class _Overflow(Exception):
    """A follower fell too far behind the live feed: end its stream (the browser resumes from the log)."""


class StatusFeed:
    """A projector listener that hands each folded entry, with the VM / host / job views it produced, to the
    live SSE streams. Does nothing while nobody follows."""

    QUEUE_MAX = 10_000

    def __init__(self, config: Any) -> None:
        self.config = config
        self._queues: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.QUEUE_MAX)
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._queues.discard(q)

    def on_event(self, ev: Any, model: Any) -> None:
        if not self._queues:
            return
        data = self.describe(ev, model)
        for q in list(self._queues):
            try:
                q.put_nowait(data)
            except asyncio.QueueFull:
                self._queues.discard(q)
                q.get_nowait()  # room for the end marker
                q.put_nowait(None)

    @staticmethod
    def describe_past(ev: Any) -> dict[str, Any]:
        """An entry read back from the log: the state it produced then is not known any more."""
        from moldd.app.service import event_view

        return {"entry": event_view(ev)}

    def describe(self, ev: Any, model: Any) -> dict[str, Any]:
        """An entry just folded, with the views of what it changed (copies: later folds do not show through)."""
        from moldd.app.service import event_view

        sid: str = ev.stream_id
        data: dict[str, Any] = {"entry": event_view(ev)}
        if sid.startswith("vm-"):
            vm = model.vms.get(sid[3:])
            if vm is not None:
                # (the host's VM counts follow with the page's next /v1/status: counting them here would
                # scan every VM for every entry)
                data["vm"] = vm_status(vm)
        elif sid.startswith("host-"):
            data["host"] = host_status(self.config, model, sid[5:])
        job_id = ev.correlation_id or ev.command_id
        job = model.jobs.get(job_id) if job_id else None
        if job is not None:
            data["job"] = job_status(job)
        return data


FEED_KEY = web.AppKey("moldd.status_feed", StatusFeed)


async def _feed_ctx(app: web.Application) -> AsyncIterator[None]:
    bus: Any = app[BUS_KEY]
    projector = getattr(bus, "projector", None)
    feed = StatusFeed(getattr(bus, "config", None))
    app[FEED_KEY] = feed
    unsubscribe = projector.add_listener(feed.on_event) if projector is not None else None
    try:
        yield
    finally:
        if unsubscribe is not None:
            unsubscribe()


async def async_events_sse(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events/sse``: log entries from ``from`` (or after ``Last-Event-ID``) on, then live ones with
    the state each produced."""
    start = _from_position(request)
    bus: Any = request.app[BUS_KEY]
    feed = request.app[FEED_KEY]
    settings = request.app[SETTINGS_KEY]
    closing = request.app[CLOSING_KEY]
    # Subscribe before reading the past: what the projection folds from now on is queued, the rest (up to
    # the position folded now) is read from the log. No gap, and duplicates are skipped by position.
    queue = feed.subscribe()
    folded = bus.model.position
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    bus.followers = getattr(bus, "followers", 0) + 1
    try:
        # retry: how long a browser waits before reconnecting after the stream broke
        await response.write(b"retry: 1000\n\n")
        sent = start - 1
        while sent < folded:
            batch = await bus.store.async_read(from_position=sent + 1, to_position=folded, limit=1000)
            if not batch:
                break
            for ev in batch:
                await asyncio.wait_for(
                    response.write(sse_frame(feed.describe_past(ev))), settings.write_timeout_s
                )
                sent = ev.position
        await _async_pump_sse(queue, response, sent, settings.heartbeat_s, settings.write_timeout_s, closing)
    except (ConnectionError, TimeoutError, _Overflow):
        if request.transport is not None:
            request.transport.abort()
    finally:
        feed.unsubscribe(queue)
        bus.followers -= 1
    return response


async def _async_pump_sse(
    queue: asyncio.Queue[dict[str, Any] | None],
    response: web.StreamResponse,
    sent: int,
    heartbeat_s: float,
    write_timeout_s: float,
    closing: asyncio.Event,
) -> None:
    closing_wait = asyncio.ensure_future(closing.wait())
    next_item: asyncio.Future[dict[str, Any] | None] | None = None
    try:
        while not closing.is_set():
            if next_item is None:
                next_item = asyncio.ensure_future(queue.get())
            waiters: set[asyncio.Future[Any]] = {next_item, closing_wait}
            done, _ = await asyncio.wait(waiters, timeout=heartbeat_s, return_when=asyncio.FIRST_COMPLETED)
            if next_item in done:
                data, next_item = next_item.result(), None
                if data is None:
                    raise _Overflow
                if data["entry"]["position"] <= sent:
                    continue  # already sent from the log
                await asyncio.wait_for(response.write(sse_frame(data)), write_timeout_s)
                sent = data["entry"]["position"]
            elif not done:
                # an SSE comment: keeps proxies from closing an idle stream, lets the page see it is alive
                await asyncio.wait_for(
                    response.write(b": heartbeat %d\n\n" % int(time.time())), write_timeout_s
                )
    finally:
        closing_wait.cancel()
        if next_item is not None:
            next_item.cancel()
