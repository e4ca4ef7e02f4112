"""structlog configuration: JSON lines to unbuffered stdout, console rendering on a TTY.

Library logging (asyncio, botocore) is routed through the same processors and stream, so an
operator tailing `journalctl -f` or `docker logs` sees one JSON object per line, whatever wrote it.
Context is bound with contextvars, never interpolated into messages.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

from orchestrator import models
from orchestrator.settings import LoggingSettings

log = structlog.get_logger("orchestrator")


def _dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default or str).decode()


def _leading_keys(_: Any, __: str, event_dict: structlog.typing.EventDict) -> Any:
    """timestamp, level and event first: the line reads well in `journalctl -f` too."""
    head = {
        key: event_dict.pop(key) for key in ("timestamp", "level", "event") if key in event_dict
    }
    return {**head, **event_dict}


def configure(settings: LoggingSettings, stream: TextIO | None = None) -> None:
    stream = stream or sys.stdout
    console = settings.format == "console" or (settings.format == "auto" and stream.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if console:
        renderer = structlog.dev.ConsoleRenderer()
    else:
        shared.extend([structlog.processors.dict_tracebacks, _leading_keys])
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)

    level = logging.getLevelName(settings.level)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # botocore is chatty at INFO about credentials and retries we already report ourselves.
    logging.getLogger("botocore").setLevel(max(level, logging.WARNING))
    logging.getLogger("aiobotocore").setLevel(max(level, logging.WARNING))


def log_transition(event: models.Event) -> None:
    """The one canonical log line per state change (a hub listener)."""
    if event.from_state is None:
        return  # acceptance is logged by the server, which knows the peer
    log.info(
        "job.state_changed",
        job_id=event.job_id,
        backend=event.backend,
        name=event.name,
        from_state=event.from_state.value,
        to_state=event.to_state.value,
        reason=event.reason,
        exit_code=event.exit_code,
    )
