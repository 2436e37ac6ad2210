"""Log injection (issue 13 item 5): nothing a client sends can start, end or rewrite a line
of the daemon's log. A real ``cached serve`` with a request policy, raw requests whose paths
carry encoded newlines, carriage returns, terminal escapes, Unicode line separators and
quotes; and the formatter with an exception whose message quotes client input."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import time
from pathlib import Path

import rawhttp
from daemonproc import CachedProcess
from fakeglance import FakeGlance

from cached.ops import logs

# How every record of the daemon's (non-journal) log starts.
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
FAKE = "2026-12-07%2001:02:03,456%20INFO%20cached.access:%20127.0.0.1%20%22GET%20/FORGED"
PATHS = [
    f"/v2/images/%0a{FAKE}-1/file",  # a download route
    f"/v2/images/x%0d%0a{FAKE}-2",  # refused by the policy: the refusal line and the access line
    f"/v2/x%1b[2J%e2%80%a8{FAKE}-3%c2%85",  # passed through: ESC, U+2028, NEL
    "/v2/a%22%20200%200%20image=FORGED-4%22%5c",  # quotes and a backslash in a quoted field
]


def _lines_with(output: str, word: str) -> list[str]:
    return [line for line in output.splitlines() if word in line]


async def test_client_input_cannot_forge_log_lines(glance: FakeGlance, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text('routes:\n  - {method: DELETE, path: /v2/**, rule: "!"}\n')
    config = tmp_path / "cached.yaml"
    config.write_text(json.dumps({"policy": str(policy)}))
    (tmp_path / "cache").mkdir()
    proc = CachedProcess(glance.url, tmp_path / "cache", tmp_path / "log", "-c", str(config))
    await asyncio.to_thread(proc.start)
    try:
        statuses = []
        for method, path in zip(("GET", "DELETE", "GET", "GET"), PATHS, strict=True):
            raw = f"{method} {path} HTTP/1.1\r\nHost: c\r\nConnection: close\r\n\r\n".encode()
            statuses.append((await asyncio.to_thread(rawhttp.request, proc.url, raw)).status)
        assert statuses[1] == 403  # the policy refused the DELETE

        def logged() -> str:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                output = proc.output()
                if all(_lines_with(output, f"FORGED-{n}") for n in (1, 3, 4)) and (
                    len(_lines_with(output, "FORGED-2")) >= 2
                ):
                    return output
                time.sleep(0.02)
            raise AssertionError(f"the requests were never logged:\n{proc.output()}")

        output = await asyncio.to_thread(logged)
    finally:
        await asyncio.to_thread(proc.stop)
    for line in output.splitlines():
        assert RECORD.match(line), f"a line that is no record: {line!r}"
    for forbidden in ("\x1b", "\r", "\u2028", "\x85"):
        assert forbidden not in output
    (first,) = _lines_with(output, "FORGED-1")
    assert '"GET /v2/images/\\x0a2026-12-07 01:02:03,456 INFO cached.access: 127.0.0.1 ' in first
    refusal, access = _lines_with(output, "FORGED-2")
    assert "policy: DELETE /v2/images/x\\x0d\\x0a2026-12-07" in refusal
    assert '"DELETE /v2/images/x\\x0d\\x0a2026-12-07' in access and '" 403 ' in access
    (third,) = _lines_with(output, "FORGED-3")
    assert "/v2/x\\x1b[2J\\u20282026" in third and "FORGED-3\\x85 HTTP/1.1" in third
    (fourth,) = _lines_with(output, "FORGED-4")
    # The path's quotes and backslash are escaped: the quoted request field ends where
    # cached put its quote, and the status is the real one.
    assert f'"GET /v2/a\\x22 200 0 image=FORGED-4\\x22\\x5c HTTP/1.1" {statuses[3]} ' in fourth


def test_a_traceback_quoting_client_input_stays_under_its_record() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test.log_injection")
    logger.propagate = False
    logger.addHandler(logs.make_handler(stream))
    try:
        try:
            raise ValueError("bad path /x\n2026-12-07 01:02:03,456 INFO cached: FORGED\r")
        except ValueError:
            logger.exception("handling %s failed", "/x\n2026-12-07 FORGED-in-message")
    finally:
        logger.handlers.clear()
    first, *rest = stream.getvalue().splitlines()
    assert RECORD.match(first) and first.endswith(
        "handling /x\\x0a2026-12-07 FORGED-in-message failed"
    )
    assert rest and all(line.startswith("    ") for line in rest), rest
    assert "    2026-12-07 01:02:03,456 INFO cached: FORGED\\x0d" in rest


def test_journal_lines_carry_their_priority_whatever_the_client_sent() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("test.log_injection.journal")
    logger.propagate = False
    logger.addHandler(logs.make_handler(stream, journal=True))
    try:
        try:
            raise ValueError("/x\n<3>cached: FORGED error")
        except ValueError:
            logger.warning(
                "policy: DELETE %s refused", "/x\n<3>cached: FORGED\u2028", exc_info=True
            )
    finally:
        logger.handlers.clear()
    first, *rest = stream.getvalue().splitlines()
    assert first == (
        "<4>test.log_injection.journal: policy: DELETE /x\\x0a<3>cached: FORGED\\u2028 refused"
    )
    assert rest and all(line.startswith("<4>    ") for line in rest), rest
