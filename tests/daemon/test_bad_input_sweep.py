"""Every verb × every argument × a table of wrong values → a 4xx JSON error whose ``field`` names the argument,
and the log head does not move (real daemon, real socket, real lab hosts).

``null`` is not in the table: an argument given as null counts as not given (its default applies)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from moldlab.testing.harness import Client

pytestmark = pytest.mark.libvirt

# Wrong for every argument (whatever its kind) ...
WRONG: list[tuple[str, Any]] = [
    ("negative", -1),
    ("huge", 2**64),
    ("float", 1.5),
    ("float-integral", 2.0),
    ("list", [1]),
    ("empty-list", []),
    ("empty", ""),
    ("blank", "   "),
    ("10kB", "x" * 10_240),
    ("nul", "a\x00b"),
    ("control", "\x1b[31mred"),
    ("double-minus", "--5"),
    ("superscript-digit", "²"),
    ("arabic-digit", "٣"),
    ("5000-digits", "9" * 5000),
    ("dict", {"x": 1}),
    ("bool", True),
]
# ... except where a value of that kind is right (a VM may be named by its numeric id, a boolean is a boolean).
RIGHT_FOR = {
    "bool": {"ha", "startvm", "forced", "expunge", "listall", "shrinkok", "snapshotmemory", "ungroup", "newest"},
    "dict": {"details"},  # a mapping, refused by its key instead (details.x): checked below
}
INTEGER_ARGS = {"rootdisksize", "hapriority", "size", "page", "pagesize", "from", "limit"}
ONLY_FOR_INTEGERS = {"double-minus", "superscript-digit", "arabic-digit"}  # fine text for a free-text argument
VM_REFERENCES = {"id", "vm"}  # numbers are VM ids here: an unknown one is 404, still naming the field


def baseline(verb: str, vm: str) -> dict[str, Any]:
    """Arguments that make ``verb`` otherwise valid enough to reach the argument under test."""
    vm_verbs = {
        "startVirtualMachine", "stopVirtualMachine", "rebootVirtualMachine", "destroyVirtualMachine",
        "recoverVirtualMachine", "expungeVirtualMachine", "updateVirtualMachine", "updateVirtualMachineSettings",
        "changeServiceForVirtualMachine", "scaleVirtualMachine", "resizeVolume", "migrateVirtualMachine",
        "restoreVirtualMachine", "getVirtualMachineConsole", "attachIso", "detachIso", "createVMSnapshot",
        "listVMSnapshots", "revertToVMSnapshot", "deleteVMSnapshot",
    }  # fmt: skip
    if verb == "resizeVolume":
        return {"id": vm, "size": 1}
    if verb in {"revertToVMSnapshot", "deleteVMSnapshot"}:
        return {"id": vm, "name": "no-such-snapshot"}
    if verb in vm_verbs:
        return {"id": vm}
    return {
        "deployVirtualMachine": {"template": "tiny", "offering": "small"},
        "deleteInstanceGroup": {"name": "sweep-group"},
        "createInstanceGroup": {"name": "sweep-new"},
        "confirmHostFenced": {"host": "host0"},
        "queryAsyncJobResult": {"jobid": "nope"},
        "createUser": {"username": "sweep-user"},
        "revokeUser": {"username": "no-such-user"},
        "registerUserKeys": {"username": "no-such-user"},
    }.get(verb, {})


async def arguments_of(client: Client, verb: str) -> list[str]:
    status, reply = await client.raw(verb, {"__probe__": 1})
    assert status == 400 and reply["error"]["field"] == "__probe__", (verb, reply)
    listed = re.search(r"this command takes: ([^)]*)\)", reply["error"]["message"])
    assert listed is not None, reply
    return [a.strip() for a in listed.group(1).split(",") if a.strip()]


async def test_every_verb_every_argument_every_wrong_value(daemon: Any, client: Client) -> None:
    job = await client.job("deployVirtualMachine", template="tiny", offering="small")
    vm = job["vm"]
    await client.call("createInstanceGroup", name="sweep-group")
    head = (await daemon.store.async_head())[0]
    verbs = daemon.app.verbs()
    assert len(verbs) >= 30
    problems: list[str] = []
    tried = 0
    for verb in verbs:
        for arg in await arguments_of(client, verb):
            for label, value in WRONG:
                if arg in RIGHT_FOR.get(label, ()) or (label in ONLY_FOR_INTEGERS and arg not in INTEGER_ARGS):
                    continue
                if (verb, arg, label) == ("updateVirtualMachine", "group", "empty"):
                    continue  # group "" takes the VM out of its group
                args = baseline(verb, vm) | {arg: value}
                status, reply = await client.raw(verb, args)
                tried += 1
                error = reply.get("error") or {}
                field = str(error.get("field"))
                named = field == arg or field.startswith(f"{arg}.")
                if arg in VM_REFERENCES and status == 404:
                    named = field in VM_REFERENCES
                if not (400 <= status < 500 and named):
                    problems.append(f"{verb} {arg}={label}: {status} {error or reply.get('result')}")
                now = (await daemon.store.async_head())[0]
                if now != head:
                    problems.append(f"{verb} {arg}={label}: the log moved {head} -> {now}")
                    head = now
    for verb in ("deployVirtualMachine", "updateVirtualMachine", "updateVirtualMachineSettings"):
        status, reply = await client.raw(verb, baseline(verb, vm) | {"details": {"no_such_setting": 1}})
        tried += 1
        if not (status == 400 and reply["error"]["field"] == "details.no_such_setting"):
            problems.append(f"{verb} details={{no_such_setting: 1}}: {status} {reply.get('error')}")
    assert (await daemon.store.async_head())[0] == head
    assert tried > 1000
    assert not problems, f"{len(problems)} of {tried}:\n" + "\n".join(problems[:80])


async def test_nan_and_infinity_are_refused_as_bad_json(client: Client) -> None:
    assert client._session is not None
    for token in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"command": "resizeVolume", "args": {"id": "x", "size": ' + token + b"}}"
        async with client._session.post(
            "http://moldd/v1/command", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            reply = await resp.json()
        assert resp.status == 400 and reply["error"]["field"] == "body", reply
