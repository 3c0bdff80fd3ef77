"""Structured logging for the daemon: one JSON object per line on stderr.

Every line has ``timestamp`` (ISO 8601 UTC), ``level`` and ``event``, plus whatever fields were bound
(``vm=``, ``host=``, ``command_id=``, ``actor=`` ...), either per call or through
``structlog.contextvars.bind_contextvars``. Standard-library loggers (aiohttp, asyncio) are routed
through the same renderer so nothing prints in another format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

from moldd.observe import journald

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _level_number(level: str | int) -> int:
    if isinstance(level, int):
        return level
    try:
        return _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}") from None


class _SkipEmptyHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """In journal mode a record already sent to journald formats to ``""``: print nothing for it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if text:
            self.stream.write(text + self.terminator)
            self.flush()


def configure_logging(
    level: str | int = "info",
    json: bool = True,
    stream: TextIO | None = None,
    *,
    journal: bool | None = None,
    journal_socket: str = journald.DEFAULT_SOCKET,
) -> None:
    """Configure structlog (and stdlib logging) once, at daemon start-up.

    ``json=False`` renders coloured key=value lines for a person at a terminal. ``journal``: send records to
    journald with structured fields (``MOLDD_VM=``, ``MOLDD_HOST=``, ``MOLDD_EVENT_POSITION=``, ``PRIORITY``;
    see :mod:`moldd.observe.journald`); ``None`` decides from ``$MOLDD_LOG_TARGET`` / ``$JOURNAL_STREAM``.
    """
    out = sys.stderr if stream is None else stream
    if journal is None:
        journal = journald.use_journal(stream=out)
    number = _level_number(level)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: Processor
    if json:
        renderer = structlog.processors.JSONRenderer(default=str)
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    final: Processor = renderer
    stdlib_final: Processor = renderer
    if journal:
        sender = journald.JournalSender(journal_socket)
        final = journald.JournalRenderer(sender, renderer, drop=True)
        stdlib_final = journald.JournalRenderer(sender, renderer, drop=False)
    structlog.configure(
        processors=[*shared, final],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    handler = _SkipEmptyHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, stdlib_final],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(number)


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A structlog logger, optionally with fields bound (``get_logger(__name__, vm="web-1")``)."""
    log = structlog.get_logger(name)
    return log.bind(**bound) if bound else log
