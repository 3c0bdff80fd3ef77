"""Read verbs: answered from the read model (and the log for listEvents); they write nothing."""

from __future__ import annotations

from typing import Any

from moldd.app.args import MAX_POSITION, Args
from moldd.app.bus import CommandReply
from moldd.app.listing import ViewList, cache_for, view_list
from moldd.app.placement import capacities
from moldd.app.service import App, Command, event_view, verb
from moldd.domain.errors import NotFound, ValidationError
from moldd.domain.states import VMState
from moldd.projection.model import VM


def _reply(app: App, result: Any) -> CommandReply:
    return CommandReply(result=result, position=app.model.position)


@verb("listVirtualMachines")
async def list_vms(app: App, cmd: Command) -> CommandReply:
    a = Args(
        cmd.args,
        {"id", "group", "state", "host", "listall", "keyword", "page", "pagesize"},
        {"groupid": "group", "hostid": "host", "name": "id"},
    )
    state = a.text("state", None)
    if state is not None and state not in {s.value for s in VMState}:
        raise ValidationError(f"state must be one of {', '.join(s.value for s in VMState)}", field="state")
    group, host, keyword = a.text("group", None), a.text("host", None), a.text("keyword", None)
    if group is not None and group not in app.model.groups:
        raise NotFound(f"no VM group {group!r}", field="group")
    model = app.model
    if "id" in a:
        one = [app.get_vm({"id": a.raw("id")}, expunged=a.boolean("listall", False))]
        page, pagesize = _paging(a)
        matches = _filtered(one, state, group, host, keyword)
        shown = matches[(page - 1) * pagesize : page * pagesize] if pagesize is not None else matches
        return _reply(app, {"count": len(matches), "virtualmachine": [v.view() for v in shown]})
    listall = a.boolean("listall", False) or state == "Expunged"
    page, pagesize = _paging(a)
    # Lists are answered from a cache valid at this log position only (moldd.app.listing): identical requests
    # between two events share one list and its encoded JSON; a miss builds it as below.
    cache = cache_for(model)
    filters = (listall, state, group, host, keyword)

    def matching() -> list[VM]:
        # in id order already, cached by the read model: a page costs its slice, not a sort of every VM
        return _filtered(model.vms_listed(listall), state, group, host, keyword)

    def build() -> tuple[int, ViewList]:
        matches: list[VM] = cache.get(filters, matching)
        shown = matches[(page - 1) * pagesize : page * pagesize] if pagesize is not None else matches
        return len(matches), view_list(shown, cache)

    count, views = cache.get((*filters, page, pagesize), build)
    # Shared read-only views: the reply is encoded at once and each VM's JSON is cached until it changes.
    return _reply(app, {"count": count, "virtualmachine": views})


def _filtered(
    vms: list[VM], state: str | None, group: str | None, host: str | None, keyword: str | None
) -> list[VM]:
    if state is None and group is None and host is None and keyword is None:
        return vms
    kw = keyword.lower() if keyword is not None else None
    return [
        v
        for v in vms
        if (state is None or v.state == state)
        and (group is None or v.group == group)
        and (host is None or v.host == host)
        and (kw is None or kw in f"{v.name} {v.display_name} {v.hostname}".lower())
    ]


MAX_PAGE_SIZE = 10000
MAX_PAGE = 1_000_000


def _paging(a: Args) -> tuple[int, int | None]:
    """CloudStack paging: ``page`` (from 1) with ``pagesize``; without them, every match. ``count`` stays the
    number of matches, so a client knows how many pages there are."""
    pagesize = a.integer("pagesize", None, min=1, max=MAX_PAGE_SIZE)
    page = a.integer("page", None, min=1, max=MAX_PAGE)
    if page is not None and pagesize is None:
        raise ValidationError("page needs pagesize (the number of items per page)", field="pagesize")
    return (page or 1), pagesize


@verb("listHosts")
async def list_hosts(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    hosts = []
    for h in app.config.hosts:
        state = app.model.hosts.get(h.name)
        view = (
            state.to_dict()
            if state
            else {"name": h.name, "uri": h.uri, "cluster": h.cluster, "max_vms": h.max_vms}
        )
        view |= app.model.host_counts(h.name)
        hosts.append(view)
    return _reply(app, {"count": len(hosts), "host": hosts})


@verb("listClusters")
async def list_clusters(app: App, cmd: Command) -> CommandReply:
    Args(cmd.args, set())
    caps = [c.to_dict() for c in capacities(app.config, app.model)]
    return _reply(app, {"count": len(caps), "cluster": caps})


@verb("listEvents")
async def list_events(app: App, cmd: Command) -> CommandReply:
    a = Args(
        cmd.args, {"vm", "stream", "from", "limit", "type", "newest", "correlation"}, {"id": "vm", "startid": "from"}
    )
    limit = a.integer("limit", 100, min=1, max=10000)
    start = a.integer("from", 1, min=1, max=MAX_POSITION)
    event_type = a.text("type", None)
    correlation = a.text("correlation", None)  # a job's (or a command's) entries: correlation or command id
    newest = a.boolean("newest", False)  # the last ``limit`` entries (oldest first), and how many came before
    if newest and "from" in a:
        raise ValidationError("give either from (a start position) or newest, not both", field="newest")
    filtered = "vm" in a or "stream" in a or event_type is not None or correlation is not None
    if newest and not filtered:
        head, _ = await app.store.async_head()
        start = max(1, head - limit + 1)
        events = await app.store.async_read(from_position=start, limit=limit)
        more = {"older": start - 1, "from": 1} if start > 1 else {}
        return _reply(app, {"count": len(events), "event": [event_view(e) for e in events], "more": more})
    if "vm" in a:
        vm = app.get_vm({"vm": a.raw("vm")}, "vm", expunged=True)
        events = await app.store.async_read_stream(f"vm-{vm.name}")
        events = [e for e in events if e.position >= start]
    elif "stream" in a:
        events = await app.store.async_read_stream(a.text("stream"))
        events = [e for e in events if e.position >= start]
    elif correlation is not None:
        events = await app.store.async_read_correlated(correlation, from_position=start)
    else:
        events = await app.store.async_read(from_position=start, limit=limit if event_type is None else None)
    if correlation is not None and ("vm" in a or "stream" in a):
        events = [e for e in events if correlation in (e.correlation_id, e.command_id)]
    if event_type is not None:
        events = [
            e for e in events if e.event_type == event_type or e.event_type.startswith(event_type + ".")
        ]
    total = len(events)
    if newest:
        first = events[0].position if events else start
        events = events[-limit:]
        more = {"older": total - len(events), "from": first} if total > len(events) else {}
    else:
        events = events[:limit]
        more = {"newer": total - len(events), "next": events[-1].position + 1} if total > len(events) else {}
        if not more and not filtered and len(events) == limit:
            head, _ = await app.store.async_head()  # the whole log was read with a limit: say what follows
            if head > events[-1].position:
                more = {"newer": head - events[-1].position, "next": events[-1].position + 1}
    return _reply(app, {"count": len(events), "event": [event_view(e) for e in events], "more": more})


@verb("queryAsyncJobResult")
async def query_job(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"jobid"}, {"id": "jobid"})
    return _reply(app, {"job": app.job_view(a.text("jobid"))})


@verb("listAsyncJobs")
async def list_jobs(app: App, cmd: Command) -> CommandReply:
    a = Args(cmd.args, {"status", "vm", "limit"})
    status, vm = a.text("status", None), a.text("vm", None)
    limit = a.integer("limit", 100, min=1, max=10000)
    jobs = [
        j.to_dict()
        for j in app.model.jobs.values()
        if (status is None or j.status == status) and (vm is None or j.vm == vm)
    ]
    return _reply(app, {"count": len(jobs[-limit:]), "job": jobs[-limit:]})
