"""The daemon's log: one JSON object per line with timestamp, level, event and bound fields."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from moldd.logging import configure_logging, get_logger


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("debug", json=True, stream=stream)
    yield stream
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def test_log_lines_are_json_objects_with_bound_fields(log_stream: io.StringIO) -> None:
    log = get_logger("moldd.test", host="h1")
    log.info("vm_started", vm="web-1", command_id="c-1", actor="uid=0(root) gid=0 pid=1")
    structlog.contextvars.bind_contextvars(command_id="c-2")
    try:
        log.warning("vm_stopped\nunexpectedly", vm="web-2")
    finally:
        structlog.contextvars.clear_contextvars()
    logging.getLogger("aiohttp.access").error("from the stdlib")

    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3
    first, second, third = (json.loads(line) for line in lines)
    assert first["event"] == "vm_started" and first["level"] == "info"
    assert (first["vm"], first["host"], first["command_id"]) == ("web-1", "h1", "c-1")
    assert first["actor"] == "uid=0(root) gid=0 pid=1"
    assert first["timestamp"].endswith("Z")
    assert (second["level"], second["command_id"], second["vm"]) == ("warning", "c-2", "web-2")
    assert (third["event"], third["level"]) == ("from the stdlib", "error")


def test_level_filters_and_exceptions_stay_on_one_line(log_stream: io.StringIO) -> None:
    configure_logging("warning", stream=log_stream)
    log = get_logger()
    log.info("hidden")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", vm="web-1")
    (line,) = log_stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["event"] == "failed" and "RuntimeError: boom" in entry["exception"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud")
