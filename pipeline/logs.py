"""Structured logging: one line per event, text or JSON, with secrets scrubbed.

Code logs `log.info("connected", extra={"conn": cid, "streams": 12})`; the JSON formatter
writes every `extra` field. Secrets should never reach a log call in the first place; as a
second line of defence every value registered with `register_secret` is replaced by a mask in
the final line, whatever path it took to get there.

Text from outside (the exchange's error messages, close reasons, a URL from a setting) can
hold line breaks and terminal escapes. In a text line the message and every `extra` value are
`escape`d, so one record is one line and nothing in it can pass for another record or move
the cursor; a traceback keeps its lines, each continuation indented. JSON escapes them itself.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

_SECRETS: set[str] = set()
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def register_secret(value: str) -> None:
    if value and len(value) >= 6:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, f"{secret[:4]}…({len(secret)})")
    return text


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` on one line: control characters (line breaks, ESC, ...) as `\\n`, `\\x1b`."""
    return _CONTROL.sub(_escaped, text)


def _escaped(m: re.Match[str]) -> str:
    c = m[0]
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def _extras(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return scrub(orjson.dumps(doc, default=str).decode())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={escape(str(v))}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname[0]} {record.name}: {escape(record.getMessage())}"
        if extras:
            line += " " + extras
        if record.exc_info:
            trace = self.formatException(record.exc_info).splitlines()
            line += "".join("\n  " + escape(t) for t in trace)
        return scrub(line)


class _Label(logging.Filter):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self.fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def label_lines(**fields: str) -> None:
    """Every line this process logs from now on carries `fields` (an ingestor's `account` or
    `shard`), so the lines of several processes in one place can be told apart."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(_Label(fields))


def setup_logging(fmt: str = "text", level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request URL at INFO; a URL can carry a listenKey or a signature
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    logging.getLogger("trio-websocket").setLevel(logging.WARNING)
