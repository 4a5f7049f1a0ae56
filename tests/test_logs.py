"""Text from outside goes into a text log line escaped: one record, one line, no terminal
escape; and the one-line error of a bad setting stays one line whatever the exchange said."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.localredis import LocalRedis
from pipeline.logs import JsonFormatter, TextFormatter
from tests.conftest import run_cli

FORGED = "Invalid symbol.\n12:00:00 I pipeline.ingest_market: all good\x1b[2J"


def record(msg: str, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("pipeline.rest", logging.WARNING, __file__, 1, msg, (),
                            (type(exc), exc, exc.__traceback__) if exc else None)
    rec.__dict__.update(extra)
    return rec


def test_a_text_line_holds_the_exchanges_text_escaped_on_one_line() -> None:
    line = TextFormatter().format(record(f"exchange said {FORGED}", error=FORGED))
    assert "\n" not in line and "\x1b" not in line
    assert line.count("12:00:00 I pipeline.ingest_market: all good") == 2
    assert "Invalid symbol.\\n12:00:00" in line and "\\x1b[2J" in line


def test_a_traceback_keeps_its_lines_but_none_can_pass_for_a_record() -> None:
    try:
        raise RuntimeError(FORGED)
    except RuntimeError as exc:
        text = TextFormatter().format(record("connection failed", exc))
    first, *rest = text.splitlines()
    assert first.endswith("pipeline.rest: connection failed")
    assert rest and all(line.startswith("  ") for line in rest)
    assert "\x1b" not in text


def test_json_lines_escape_it_themselves() -> None:
    line = JsonFormatter().format(record("said", error=FORGED))
    assert "\n" not in line and json.loads(line)["error"] == FORGED


@pytest.fixture
def exchange_that_says_too_much() -> Iterator[str]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"code": -1121, "msg": FORGED}).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_bad_setting_quoting_the_exchange_is_still_one_line(
        redis_server: LocalRedis, exchange_that_says_too_much: str) -> None:
    res = run_cli("ingest", "market", env={"REDIS_URL": redis_server.url,
                                           "PIPELINE_SYMBOLS": "ALL",
                                           "BINANCE_REST_URL": exchange_that_says_too_much})
    assert res.returncode == 2
    line, = res.stderr.strip().splitlines()
    assert line.startswith("pipeline: bad setting PIPELINE_SYMBOLS: ")
    assert "Invalid symbol.\\n12:00:00" in line and "\x1b" not in line
