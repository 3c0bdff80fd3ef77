"""The live status page in a real headless Chromium against a real daemon on lab hosts: a guest's QEMU is
killed and the page, without a reload, shows the VM go Stopped → Running, with the HA entries linked to
the libvirt event that caused them. Screenshots (desktop and phone) go to the test's tmp dir."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from moldlab.testing.harness import Client
from tests.daemon.test_ha import deploy_ha, qemu_pid, wait_event
from tests.observe.browser import chromium, chromium_path, forward_tcp_to_unix, open_page

pytestmark = [
    pytest.mark.libvirt,
    pytest.mark.slow,
    pytest.mark.skipif(chromium_path() is None, reason="needs Debian's chromium (scripts/install.sh)"),
    pytest.mark.timeout(240),
]


def state_of(vm: str) -> str:
    return f"document.querySelector({json.dumps('#vm-' + vm + ' [data-field=state] .badge')})?.dataset.value"


RECORD_STATES = """
(() => {
  window.__noReload = true;
  window.__seen = [];
  const note = () => {
    const v = %s;
    if (v && window.__seen[window.__seen.length - 1] !== v) window.__seen.push(v);
  };
  note();
  new MutationObserver(note).observe(document.getElementById("vms"), {subtree: true, childList: true});
  return true;
})()
"""


async def test_status_page_shows_an_ha_restart_live(
    daemon: Any, client: Client, clean_lab: Any, tmp_path: Path
) -> None:
    vm = await deploy_ha(client)
    name = vm["name"]
    async with (
        forward_tcp_to_unix(str(daemon.config.socket)) as port,
        chromium(tmp_path / "chromium") as (session, devtools),
        open_page(session, devtools) as page,
    ):
        await page.send("Page.navigate", url=f"http://127.0.0.1:{port}/status")
        await page.wait_for(f"{state_of(name)} === 'Running'", what=f"{name} Running")
        await page.wait_for("document.getElementById('conn').dataset.state === 'live'", what="live stream")
        assert await page.evaluate("document.title") == "moldd status"
        assert await page.evaluate(RECORD_STATES % state_of(name))

        pos = (await client.events(name))[-1]["position"]
        os.kill(qemu_pid(clean_lab, vm["host"], vm["internal_name"]), signal.SIGKILL)
        crash = await wait_event(client, name, "libvirt.domain_event", after=pos)
        await wait_event(client, name, "ha.restart.succeeded", after=pos)

        restarted = f'document.querySelector(\'#timeline li[data-type="ha.restart.succeeded"][data-stream="vm-{name}"]\')'
        await page.wait_for(f"!!{restarted}", what="ha.restart.succeeded in the timeline")
        seen = await page.wait_for(
            "window.__seen.includes('Stopped') && window.__seen[window.__seen.length - 1] === 'Running'"
            " && window.__seen",
            what="Stopped then Running",
        )
        assert seen.index("Stopped") < len(seen) - 1 and seen[0] == "Running", seen
        assert await page.evaluate("window.__noReload === true")  # the same document all along
        # at that same moment the host's counts and the cluster's headroom agree with the VM rows
        counts = await page.evaluate(
            f"document.querySelector('#host-{vm['host']} td[data-label=\"VMs (running)\"]').textContent"
        )
        assert counts.startswith("1 (1)"), counts
        assert (
            await page.evaluate(
                "document.querySelector('[data-cluster=c1] [data-field=headroom]').textContent"
            )
            == "3"
        )

        # each HA decision links to its cause: the libvirt event's own entry in the timeline
        link = "document.querySelector('#timeline li[data-type=\"ha.restart.scheduled\"] a.cause')"
        assert await page.evaluate(f"{link}?.getAttribute('href')") == f"#ev-{crash['position']}"
        cause_type = await page.evaluate(f"document.getElementById('ev-{crash['position']}')?.dataset.type")
        assert cause_type == "libvirt.domain_event"

        hosts_up = await page.evaluate(
            "document.querySelectorAll('#hosts [data-field=health] .badge[data-value=Up]').length"
        )
        assert hosts_up == 2
        assert not page.exceptions, page.exceptions

        # accessible: what a screen reader gets from Chromium's accessibility tree
        await page.send("Accessibility.enable")
        nodes = (await page.send("Accessibility.getFullAXTree"))["nodes"]
        named: dict[str, list[str]] = {}
        for node in nodes:
            if node.get("ignored"):
                continue
            role = node.get("role", {}).get("value", "")
            named.setdefault(role, []).append(str(node.get("name", {}).get("value", "")).strip())
        assert named.get("link") and all(named["link"]), named.get("link")  # every link says where it goes
        tables = named.get("table", [])
        assert len(tables) == 3 and all(tables), tables  # each table is named by its caption
        assert sorted(named.get("heading", []))[:2] == ["Clusters", "Event timeline (newest first, live)"]
        assert await page.evaluate("document.documentElement.lang") == "en"
        assert (
            await page.evaluate("document.getElementById('timeline').getAttribute('aria-live')") == "polite"
        )
        shot = await page.screenshot(tmp_path / "status-desktop.png")
        await page.evaluate(f"{link}.click()")  # following it lands on the cause
        assert await page.evaluate("location.hash") == f"#ev-{crash['position']}"

        await page.send(
            "Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True
        )
        # on a phone the VM table turns into cards, each cell labelled; nothing scrolls sideways
        assert await page.wait_for(
            "document.documentElement.scrollWidth <= window.innerWidth + 1", what="no side scroll"
        )
        assert (
            await page.evaluate(f"getComputedStyle(document.querySelector('#vm-{name}')).display") == "block"
        )
        phone = await page.screenshot(tmp_path / "status-phone.png")
    assert shot.stat().st_size > 10_000 and phone.stat().st_size > 10_000
    print(f"screenshots: {shot} {phone}")
