"""Keep secrets out of every log line, `-v` debug output included.

With ``-v`` the OpenStack SDK (keystoneauth) logs request and response bodies: the
create-server request and every server read carry ``user_data``, the base64 NoCloud seed with
the broker and Redis passwords. A filter on the CLI's log handler rewrites each record before
it is written:

* the value of any ``user_data`` field (``OS-EXT-SRV-ATTR:user_data`` too, JSON or repr) and of
  password/token-like fields becomes ``<redacted>``;
* every secret registered with :func:`register` (the deploy's generated passwords) is masked
  wherever it appears, plain or inside a URL.
"""

from __future__ import annotations

import logging
import re
import threading

REDACTED = "<redacted>"
_FIELDS = r"(?:[\w.-]*:)?(?:user_data|password|adminPass|secret|token)"
# "field": "value"  or  'field': 'value'  (JSON bodies and Python reprs)
_FIELD_VALUE = re.compile(r"""(?P<key>(?P<q>["'])""" + _FIELDS + r"""(?P=q)\s*:\s*)(?P<vq>["'])"""
                          r"""(?:\\.|(?!(?P=vq)).)*(?P=vq)""", re.IGNORECASE)
_lock = threading.Lock()
_secrets: set[str] = set()


def register(*secrets: str) -> None:
    """Mask these strings in every later log record (ignored when shorter than 8 chars)."""
    with _lock:
        _secrets.update(s for s in secrets if s and len(s) >= 8)


def redact(text: str) -> str:
    """``text`` with secret-bearing fields and registered secrets replaced."""
    text = _FIELD_VALUE.sub(lambda m: f"{m['key']}{m['vq']}{REDACTED}{m['vq']}", text)
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


class RedactFilter(logging.Filter):
    """Rewrites a record's message (args merged in) through :func:`redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is the logger's problem
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to every handler of ``logger`` (the root logger by default)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
