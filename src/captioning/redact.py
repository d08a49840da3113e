"""Passwords inside URLs (``https://user:secret@host``) never reach a log, an error, a summary or a plan."""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://user:password@ -> scheme://user:***@ (a user name alone is kept: it is not a secret)
# The password runs to the authority's last "@" (it may hold "@" and quotes itself).
_USERINFO_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/]*@")


def redact(text: str) -> str:
    return _USERINFO_PASSWORD.sub(r"\g<head>***@", text)


def redact_tree(data: Any) -> Any:
    """The same for every string of a JSON-like tree (configs, summaries, plans)."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {key: redact_tree(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [redact_tree(value) for value in data]
    return data


class RedactingFilter(logging.Filter):
    """On a handler: each record's message is formatted once and redacted before any output sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, ()
        return True
