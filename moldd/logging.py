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


def configure_logging(level: str | int = "info", json: bool = True, stream: TextIO | None = None) -> None:
    """Configure structlog (and stdlib logging) once, at daemon start-up.

    ``json=False`` renders coloured key=value lines for a person at a terminal.
    """
    out = sys.stderr if stream is None else stream
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
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(number)


def get_logger(name: str | None = None, **bound: Any) -> Any:
    """A structlog logger, optionally with fields bound (``get_logger(__name__, vm="web-1")``)."""
    log = structlog.get_logger(name)
    return log.bind(**bound) if bound else log
