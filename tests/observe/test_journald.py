"""journald's native protocol, received on a real datagram socket the test binds (what journald listens on),
and the choice between journal and JSON lines."""

from __future__ import annotations

import array
import io
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from events import MemoryEventStore, NewEvent
from moldd.logging import configure_logging, get_logger
from moldd.observe import journald


def parse(datagram: bytes) -> dict[str, str]:
    """The reverse of the native protocol, written from systemd.journal-fields(7) / sd_journal_sendv()."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            i = nl + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", datagram[nl + 1 : nl + 9])
            value = datagram[nl + 9 : nl + 9 + size]
            assert datagram[nl + 9 + size : nl + 10 + size] == b"\n"
            i = nl + 10 + size
        fields[key.decode()] = value.decode()
    return fields


class FakeJournal:
    """A bound AF_UNIX datagram socket: a real one, standing where journald's would."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(5)

    def receive(self) -> dict[str, str]:
        fds = array.array("i")
        data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if fds:
            assert not data
            fd = fds[0]
            try:
                size = os.fstat(fd).st_size
                data = os.pread(fd, size, 0)
            finally:
                os.close(fd)
        return parse(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    j = FakeJournal(tmp_path / "jsock")
    yield j
    j.close()
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logging.getLogger().handlers.clear()


def test_records_carry_vm_host_position_and_priority(journal: FakeJournal) -> None:
    stream = io.StringIO()
    configure_logging("debug", stream=stream, journal=True, journal_socket=journal.path)
    get_logger("moldd.test").warning("vm_crashed", vm="web-1", host="host0", position=42, command_id="c-1")
    fields = journal.receive()
    assert fields["MOLDD_VM"] == "web-1"
    assert fields["MOLDD_HOST"] == "host0"
    assert fields["MOLDD_EVENT_POSITION"] == "42"
    assert fields["MOLDD_COMMAND_ID"] == "c-1"
    assert fields["MOLDD_EVENT"] == "vm_crashed"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "moldd"
    message = json.loads(fields["MESSAGE"])  # the same JSON line as without systemd
    assert message["vm"] == "web-1" and message["event"] == "vm_crashed" and message["level"] == "warning"
    assert stream.getvalue() == ""  # sent to the journal, not printed twice


@pytest.mark.parametrize(
    ("method", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_priority_follows_the_level(journal: FakeJournal, method: str, priority: str) -> None:
    configure_logging("debug", stream=io.StringIO(), journal=True, journal_socket=journal.path)
    getattr(get_logger("moldd.test"), method)("something")
    assert journal.receive()["PRIORITY"] == priority


def test_exception_and_newlines_use_the_binary_field_form(journal: FakeJournal) -> None:
    configure_logging("info", stream=io.StringIO(), journal=True, journal_socket=journal.path)
    try:
        raise RuntimeError("boom\nsecond line")
    except RuntimeError:
        get_logger("moldd.test").exception("watcher_crashed", vm="a\nb")
    fields = journal.receive()
    assert fields["PRIORITY"] == "3"
    assert fields["MOLDD_VM"] == "a\nb"
    assert "RuntimeError: boom" in fields["MOLDD_EXCEPTION"]
    assert "second line" in json.loads(fields["MESSAGE"])["exception"]


def test_stdlib_records_go_to_the_journal_too(journal: FakeJournal) -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream, journal=True, journal_socket=journal.path)
    logging.getLogger("aiohttp.server").error("bad request from %s", "client")
    fields = journal.receive()
    assert fields["PRIORITY"] == "3"
    assert fields["MOLDD_LOGGER"] == "aiohttp.server"
    assert json.loads(fields["MESSAGE"])["event"] == "bad request from client"
    assert stream.getvalue() == ""


def test_a_record_larger_than_a_datagram_goes_in_a_sealed_memfd(journal: FakeJournal) -> None:
    configure_logging("info", stream=io.StringIO(), journal=True, journal_socket=journal.path)
    big = "x" * (4 << 20)  # beyond any AF_UNIX datagram limit
    get_logger("moldd.test").info("huge", vm="web-2", blob=big)
    fields = journal.receive()
    assert fields["MOLDD_VM"] == "web-2" and fields["MOLDD_BLOB"] == big


def test_unreachable_journal_falls_back_to_json_lines(tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream, journal=True, journal_socket=str(tmp_path / "nobody-listens"))
    try:
        get_logger("moldd.test").info("still_logged", vm="web-3")
        logging.getLogger("asyncio").warning("stdlib too")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["still_logged", "stdlib too"]


def test_daemon_log_entry_line_is_searchable_by_vm_and_position(journal: FakeJournal) -> None:
    import asyncio

    from moldd.daemon import _log_event

    async def one_event() -> object:
        store = MemoryEventStore()
        res = await store.async_append(
            "vm-web-9", [NewEvent("vm.started", {"host": "host1"}, actor="system")]
        )
        return res.events[0]

    ev = asyncio.run(one_event())
    configure_logging("info", stream=io.StringIO(), journal=True, journal_socket=journal.path)
    _log_event(ev, None)
    fields = journal.receive()
    assert (fields["MOLDD_VM"], fields["MOLDD_HOST"], fields["MOLDD_EVENT_POSITION"]) == (
        "web-9",
        "host1",
        "1",
    )
    assert fields["MOLDD_EVENT_TYPE"] == "vm.started"


def test_journal_mode_is_chosen_by_journal_stream_or_the_switch(tmp_path: Path) -> None:
    f = (tmp_path / "stderr").open("w")
    try:
        st = os.fstat(f.fileno())
        mine = f"{st.st_dev}:{st.st_ino}"
        assert journald.use_journal({"JOURNAL_STREAM": mine}, f)
        assert not journald.use_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f)
        assert not journald.use_journal({"JOURNAL_STREAM": "garbage"}, f)
        assert not journald.use_journal({}, f)
        assert not journald.use_journal({"JOURNAL_STREAM": mine, "MOLDD_LOG_TARGET": "stderr"}, f)
        assert journald.use_journal({"MOLDD_LOG_TARGET": "journal"}, f)
        assert not journald.use_journal({"JOURNAL_STREAM": mine}, io.StringIO())  # not a file
    finally:
        f.close()


def test_field_names_are_valid_journal_fields() -> None:
    assert journald.journal_field("vm") == "MOLDD_VM"
    assert journald.journal_field("event-type.x") == "MOLDD_EVENT_TYPE_X"
    with pytest.raises(ValueError, match="journal field"):
        journald.encode({"_PRIVATE": "x"})
    assert journald.encode({"A": "1", "B": "x\ny"}) == b"A=1\nB\n" + struct.pack("<Q", 3) + b"x\ny\n"


if sys.platform != "linux":  # pragma: no cover
    pytest.skip("journald is Linux only", allow_module_level=True)
