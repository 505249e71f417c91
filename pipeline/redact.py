"""Credentials in URIs never reach a file, a log line or MLflow: ``redact_uri`` masks them.

A ``tracking.uri`` such as ``postgresql://user:secret@host/db`` or ``https://user:token@host``
carries a password. Everything we write or log that may hold a URI goes through
``redact_uri``: ``RUN_DIR/config.yaml`` and MLflow's params (``pipeline/trainer.py``,
``pipeline/tracking.py``), the tracker's messages and errors, every log record of the handlers
that ``RedactFilter`` is on (``pipeline.distributed.setup_logging``, the CLI's), and the CLI's
one-line errors. The password becomes ``***``; the user name stays, to tell accounts apart.
(The password itself belongs in the environment, e.g. MLflow's ``MLFLOW_TRACKING_PASSWORD`` or
a ``~/.pgpass`` file, where nothing of ours reads or writes it.)
"""

from __future__ import annotations

import logging
import re

__all__ = ["MASK", "RedactFilter", "redact_uri"]

MASK = "***"

# scheme://user:password@ -- the password runs to the last "@" before the host (an unescaped
# "@" inside it still hides it all); no "/" or space may occur before that "@".
_CREDENTIALS = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):[^/\s]*@")


def redact_uri(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` in it replaced by
    ``***`` (``user:***@host``); text without one comes back unchanged."""
    if "://" not in text:
        return text
    return _CREDENTIALS.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


class RedactFilter(logging.Filter):
    """A handler filter that masks URI passwords in every record it passes (message, arguments
    and exception text alike: the record is formatted once, here)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_uri(record.exc_text)
        clean = redact_uri(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True
