"""Every fold path computes exactly the state the reference fold computed on an adversarial corpus of every event
type (``fold_corpus.py``; digests recorded from the fold before its rewrite for speed): the live fold of stored
events, ``moldd-audit state`` at positions, the daemon's restore from the log, and a restore from a snapshot
taken midway followed by the tail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from events import SQLiteEventStore
from events.snapshot import async_save_sealed_snapshot_data
from moldd.app.projector import SNAPSHOT_NAME, Projector, encode_snapshot
from moldd.audit.log import open_log
from moldd.audit.state import fold, state_at
from moldd.projection import readmodel
from moldd.projection.readmodel import ReadModel
from tests.projection.fold_corpus import (
    MAX_FINISHED_JOBS,
    PRUNE_SLACK,
    REFERENCE,
    SEEDS,
    corpus,
    fold_checkpoints,
    model_digests,
    write_sqlite,
)

REF: dict[str, dict[str, dict[str, str]]] = json.loads(REFERENCE.read_text())


@pytest.fixture(autouse=True)
def small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(readmodel, "MAX_FINISHED_JOBS", MAX_FINISHED_JOBS)
    monkeypatch.setattr(readmodel, "PRUNE_SLACK", PRUNE_SLACK)


def _stored(digests: dict[str, str]) -> dict[str, str]:
    """The digests of what a snapshot keeps. Not compared after a snapshot: ``by_internal`` and ``by_apikey``,
    which ``ReadModel.from_dict`` rebuilds from the current VMs and users while the fold also keeps entries of
    a VM deployed again under the same name or of a user created again (orders the daemon refuses, which the
    corpus writes anyway); the reference fold did the same."""
    return {k: v for k, v in digests.items() if k not in ("by_internal", "by_apikey")}


@pytest.mark.parametrize("seed", SEEDS)
def test_the_live_fold_of_stored_events_matches_the_reference(seed: int) -> None:
    assert fold_checkpoints(corpus(seed)) == REF[str(seed)]


@pytest.mark.parametrize("seed", SEEDS)
def test_the_audit_fold_at_positions_matches_the_reference(seed: int, tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    write_sqlite(path, corpus(seed))
    ref = REF[str(seed)]
    positions = sorted(int(p) for p in ref)
    with open_log(path) as conn:
        for pos in positions[::3] + positions[-1:]:
            model, _, _ = fold(conn, to_position=pos)
            assert model.position == pos
            assert model_digests(model) == ref[str(pos)], pos
    st = state_at(path, at_position=positions[1])
    assert model_digests(st.model) == ref[str(positions[1])]


@pytest.mark.parametrize("seed", SEEDS)
async def test_the_daemon_restore_matches_the_reference_from_the_log_and_from_a_snapshot(
    seed: int, tmp_path: Path
) -> None:
    path = tmp_path / "log.db"
    events = corpus(seed)
    write_sqlite(path, events)
    ref = REF[str(seed)]
    last = str(len(events))
    store = await SQLiteEventStore.async_open(path)
    try:
        p = Projector(store)
        await p.async_restore()
        assert model_digests(p.model) == ref[last]
        # a snapshot taken midway (the model as the reference had it there), then the tail folded on top of it
        mid = sorted(int(k) for k in ref)[len(ref) // 2]
        half = ReadModel().apply_all(events[:mid])
        assert model_digests(half) == ref[str(mid)]
        restored = ReadModel.from_dict(json.loads(encode_snapshot(half.snapshot_parts())))
        assert _stored(model_digests(restored)) == _stored(ref[str(mid)])
        await async_save_sealed_snapshot_data(store, SNAPSHOT_NAME, mid, encode_snapshot(half.snapshot_parts()))
        again = Projector(store)
        assert await again.async_load_snapshot() == mid
        await again.async_restore()
        assert again.model.position == len(events) + 1  # + the snapshot's seal (state-neutral)
        at_last = ReadModel.from_dict(again.model.to_dict())
        at_last.position = len(events)  # the seal aside
        assert _stored(model_digests(at_last)) == _stored(ref[last])
    finally:
        await store.async_close()
