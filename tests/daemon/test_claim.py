"""The one lock idiom of verbs (App.claim): released when its block ends, refusals included, unless handed to
the command's job, which holds it until it ends."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moldd.domain.errors import ValidationError

pytestmark = pytest.mark.libvirt


async def test_a_claim_is_released_when_its_block_ends_even_by_a_refusal(daemon: Any) -> None:
    app = daemon.app
    async with app.claim("vm-x"):
        assert app.locks["vm-x"].locked() and app.busy("vm-x")
    assert not app.locks["vm-x"].locked()
    with pytest.raises(ValidationError):
        async with app.claim("vm-x"):
            raise ValidationError("refused", field="id")
    assert not app.locks["vm-x"].locked()


async def test_a_claim_kept_for_a_job_is_held_until_the_job_ends(daemon: Any) -> None:
    app = daemon.app
    gate = asyncio.Event()
    async with app.claim("vm-x") as claim:
        claim.keep_for_job("job-x", gate.wait())
        with pytest.raises(RuntimeError):
            claim.keep_for_job("job-y", asyncio.sleep(0))  # one job per claim
    job = app.jobs["job-x"]
    assert app.locks["vm-x"].locked() and app.vm_jobs["vm-x"] == "job-x"
    waiter = asyncio.create_task(app.locks["vm-x"].acquire())  # a start sent meanwhile waits for the job
    await asyncio.sleep(0)
    assert not waiter.done()
    gate.set()
    await job
    await asyncio.wait_for(waiter, 10)
    app.locks["vm-x"].release()


async def test_a_job_that_crashes_still_releases_the_claim(daemon: Any) -> None:
    app = daemon.app

    async def boom() -> None:
        raise RuntimeError("job crashed")

    async with app.claim("vm-y") as claim:
        claim.keep_for_job("job-z", boom())
    await asyncio.gather(app.jobs["job-z"], return_exceptions=True)
    assert not app.locks["vm-y"].locked()
