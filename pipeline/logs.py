"""One logging set-up for both processes: human-readable lines, or JSON lines
(``LOG_FORMAT=json``).

Every line logged while a request or a job is handled carries its request id (and, in a
consumer, the job id): they live in context variables the formatters read. A job carries the
request id of the signup that queued it, so a welcome email's lines join up with the signup's.
With tracing on (``pipeline.tracing``), a line logged inside a span also carries its trace and
span ids.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Final, Literal

import orjson

from pipeline import tracing

LogFormat = Literal["text", "json"]
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("text", "json")

#: The id of the request being handled, or of the request that queued the job being run.
request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
#: The id of the job being run (consumers only).
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s:%(ids)s %(message)s"
#: Attributes every LogRecord has: anything else on a record came in through ``extra=``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "ids"}


def mask_email(address: str) -> str:
    """``alice@example.com`` -> ``a***@example.com``: what INFO lines show of an address."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"


class _Seconds:
    """The text of the current second, formatted once per second rather than once per line
    (``strftime`` is most of what formatting an access line's time costs)."""

    def __init__(self, pattern: str, convert: Callable[[float | None], time.struct_time]) -> None:
        self._pattern = pattern
        self._convert = convert
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self._pattern, self._convert(second))
        return self._text


class TextFormatter(logging.Formatter):
    """``2026-11-21 10:00:00,123 INFO consumers.handlers: [req=…] message``, with tracing on
    ``[req=… trace=… span=…]`` inside a span. (Job ids are in the messages themselves.)"""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._seconds = _Seconds(self.default_time_format, self.converter)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return f"{self._seconds(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        """TEXT_FORMAT's line, then the traceback and stack if any, as ``Formatter.format``
        makes it, in one step rather than through its format string (every request's
        access line comes through here: 1.2 us against 2.5)."""
        rid = request_id.get()
        found = None if tracing.tracer is None else tracing.log_ids()
        if found is not None:
            ids = f" [req={rid or '-'} trace={found[0]} span={found[1]}]"
        else:
            ids = "" if rid is None else f" [req={rid}]"
        record.ids = ids
        message = record.getMessage()
        # One record, one line: a line break in logged input cannot forge another line.
        # (A traceback, appended after this, keeps its lines.)
        if "\n" in message or "\r" in message:
            message = message.replace("\r", "\\r").replace("\n", "\\n")
        record.message = message
        record.asctime = asctime = self.formatTime(record)
        line = f"{asctime} {record.levelname} {record.name}:{ids} {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:  # the message ends in no line break: they are escaped
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``request_id`` and ``job_id`` when known, ``trace_id`` and ``span_id`` inside a span
    (tracing on), ``exc_info`` with a traceback, and the fields
    given through ``extra=``."""

    def __init__(self) -> None:
        super().__init__()
        self._seconds = _Seconds("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        seconds = self._seconds(record.created)
        line: dict[str, Any] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid, jid = request_id.get(), job_id.get()
        if rid is not None:
            line["request_id"] = rid
        if jid is not None:
            line["job_id"] = jid
        if tracing.tracer is not None:
            found = tracing.log_ids()
            if found is not None:
                line["trace_id"], line["span_id"] = found
        for name, value in record.__dict__.items():
            if name not in _STANDARD and name not in line:
                line[name] = value
        if record.exc_info:
            line["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str, log_format: LogFormat = "text") -> None:
    """Log to stderr at ``level`` in ``log_format``, replacing any earlier set-up. The ASGI
    server's own loggers go through the same handler (its access log is off: the web app writes
    one access line per request itself, with the request id)."""
    # What no line of ours shows, not gathered for each record (the logging HOWTO's
    # "Optimization"): the caller's file and line, thread and process names. About a fifth of
    # what an access line costs.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # The servers' own loggers (hypercorn's, and uvicorn's as the second supported server)
    # go through the same handler.
    for name in ("hypercorn.error", "hypercorn.access", "uvicorn", "uvicorn.error"):
        server = logging.getLogger(name)
        server.handlers = []
        server.propagate = True
