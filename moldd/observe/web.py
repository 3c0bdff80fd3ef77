"""Read-only routes for operators, mounted on the API application (same listener, same identity check):

* ``GET /metrics`` — Prometheus text exposition (:mod:`moldd.observe.metrics`).
* ``GET /status`` — the live status page (``static/index.html`` + ``status.css`` + ``status.js``: no build
  step, nothing fetched from elsewhere).
* ``GET /v1/status`` — one JSON document with clusters (headroom), hosts (health, link), VMs (state, power,
  HA) and jobs (in progress, with their progress; the last finished ones).
* ``GET /v1/events/sse?from=N`` — the log as Server-Sent Events: ``id:`` is the log position, so a browser's
  ``EventSource`` resumes after a dropped connection (``Last-Event-ID``) without a gap or a duplicate.

:func:`add_routes` mounts them on any ``aiohttp`` application whose ``BUS_KEY`` is the daemon's ``App``
(the CloudStack TCP listener can call it too).
"""

from __future__ import annotations

import asyncio
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
from moldd.observe.metrics import CONTENT_TYPE_LATEST, Metrics

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
VM_FIELDS = (
    "name", "display_name", "state", "power_state", "host", "cluster", "ha_enabled", "ha_policy", "ha_status",
    "job", "stop_cause", "error", "updated_at", "position",
)  # fmt: skip
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


async def async_metrics(request: web.Request) -> web.Response:
    """``GET /metrics``. Rendered on the loop: a scrape reads in-memory counters and one pass over the read
    model, cheaper than a hop to a thread."""
    body = request.app[METRICS_KEY].exposition()
    resp = web.Response(body=body)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


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


def status_document(bus: Any) -> dict[str, Any]:
    """What the page shows, from the read model as it is now."""
    from moldd.app.placement import capacities

    model = bus.model
    config = bus.config
    hosts = []
    for h in config.hosts:
        state = model.hosts.get(h.name)
        on = model.vms_on(h.name)
        hosts.append(
            {
                "name": h.name,
                "cluster": h.cluster,
                "max_vms": h.max_vms,
                "health": state.health if state else "Up",
                "health_since": state.health_since if state else "",
                "health_cause": state.health_cause if state else "",
                "link": state.link if state else "unknown",
                "link_since": state.link_since if state else "",
                "vms": len(on),
                "running": sum(1 for v in on if v.state == "Running"),
            }
        )
    vms = [
        {k: vm.__dict__.get(k) for k in VM_FIELDS}
        for vm in sorted(model.vms.values(), key=lambda v: v.id)
        if vm.state != "Expunged"
    ]
    active: list[Any] = []
    finished: list[Any] = []
    for job in model.jobs.values():
        (active if job.status in ("pending", "running") else finished).append(job)
    finished.sort(key=lambda j: j.position)
    jobs = [{k: j.__dict__.get(k) for k in JOB_FIELDS} for j in [*active, *finished[-RECENT_JOBS:]]]
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
            for c in capacities(config, model)
        ],
        "hosts": hosts,
        "vms": vms,
        "jobs": jobs,
    }


async def async_status(request: web.Request) -> web.Response:
    """``GET /v1/status``."""
    return json_response({"ok": True, "result": status_document(request.app[BUS_KEY])})


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


def sse_frame(entry: dict[str, Any]) -> bytes:
    """One log entry as an SSE message: ``id`` = position (JSON has no raw newlines, so one data line)."""
    return b"id: %d\nevent: entry\ndata: %s\n\n" % (entry["position"], dumps(entry))


async def async_events_sse(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events/sse``: log entries from ``from`` (or after ``Last-Event-ID``) on, live."""
    start = _from_position(request)
    settings = request.app[SETTINGS_KEY]
    closing = request.app[CLOSING_KEY]
    entries = request.app[BUS_KEY].async_follow(start)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    await response.prepare(request)
    try:
        # retry: how long a browser waits before reconnecting after the stream broke
        await response.write(b"retry: 1000\n\n")
        await _async_pump_sse(entries, response, settings.heartbeat_s, settings.write_timeout_s, closing)
    except (ConnectionError, TimeoutError):
        if request.transport is not None:
            request.transport.abort()
    finally:
        await entries.aclose()  # type: ignore[attr-defined]
    return response


async def _async_pump_sse(
    entries: AsyncIterator[dict[str, Any]],
    response: web.StreamResponse,
    heartbeat_s: float,
    write_timeout_s: float,
    closing: asyncio.Event,
) -> None:
    closing_wait = asyncio.ensure_future(closing.wait())
    next_entry: asyncio.Future[dict[str, Any]] | None = None
    try:
        while not closing.is_set():
            if next_entry is None:
                next_entry = asyncio.ensure_future(anext(entries))
            waiters: set[asyncio.Future[Any]] = {next_entry, closing_wait}
            done, _ = await asyncio.wait(waiters, timeout=heartbeat_s, return_when=asyncio.FIRST_COMPLETED)
            if next_entry in done:
                fut, next_entry = next_entry, None
                try:
                    entry = fut.result()
                except StopAsyncIteration:
                    return
                await asyncio.wait_for(response.write(sse_frame(entry)), write_timeout_s)
            elif not done:
                # an SSE comment: keeps proxies from closing an idle stream, lets the page see it is alive
                await asyncio.wait_for(
                    response.write(b": heartbeat %d\n\n" % int(time.time())), write_timeout_s
                )
    finally:
        closing_wait.cancel()
        if next_entry is not None:
            next_entry.cancel()
            try:
                await next_entry
            except (asyncio.CancelledError, StopAsyncIteration):
                pass
            except Exception:
                log.exception("event_follow_failed")
