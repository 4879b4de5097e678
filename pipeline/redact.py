"""Credentials never leave the process in what it prints or returns.

URLs such as `http://user:secret@mlflow:5000` or `postgresql://app:pw@db/predictions`
carry passwords; every message the project shows (HTTP error bodies, /ready and /model,
logs, `mlops status`, CLI errors) goes through `redact`, which keeps the user name and
replaces the password with `***`. Query-string secrets common in storage URLs
(`password=`, `X-Amz-Signature=`, `sig=`, `token=`) are masked too.
"""

from __future__ import annotations

import logging
import re

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_QUERY = re.compile(
    r"(?P<key>[?&;](?:password|passwd|pwd|token|access_token|secret|sig|"
    r"X-Amz-Signature|X-Amz-Credential|X-Amz-Security-Token)=)[^&\s'\"]*",
    re.IGNORECASE,
)


def redact(text: object) -> str:
    """`text` as a string with the passwords of any URLs in it replaced by `***`."""
    text = str(text)
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(r"\g<scheme>\g<user>:***@", text)
    return _QUERY.sub(r"\g<key>***", text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts the formatted message and any traceback text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install(*loggers: str) -> None:
    """Redact on every handler of the root logger and of the named loggers (uvicorn's)."""
    for name in ("", *loggers):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
