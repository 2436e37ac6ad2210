"""Logging: the daemon's handler and format, and the access log.

Owns the root logging configuration (set once by ``cli`` at start, the level changed again by
a reload) and the access logger aiohttp calls after every request. Under systemd, when
``$JOURNAL_STREAM`` names our stderr, lines carry a ``<N>`` syslog priority prefix and no
timestamp (journald adds its own); otherwise they start with the time.

The access line counts the bytes really sent: aiohttp's own counter sees only what passes its
response writer, and a sendfile download passes nothing but the headers through it, so the
reader adds what ``sendfile`` sent to the request's :class:`cached.metrics.RequestStats`.
Request headers (tokens) are never logged; configured secrets are masked from every line.

No caller can forge or hide a log line (issue 13 item 5: a ``%0a`` in a path became a
newline in the access log and the policy-refusal line). Every record's message passes
:func:`escape` in the handler's filter, whoever logged it: control characters (C0, DEL, C1,
U+2028/U+2029) become ``\\xNN``/``\\uNNNN``, so a record is one line. A traceback's lines
(which may quote client input in an exception's message) are indented under their record
(:class:`_Format`), so a line at column 0 always starts a record. The access line also
escapes ``"`` and ``\\`` in the fields it quotes (as nginx does), so its fields stay
parseable.

The filter's secrets are set by ``cli`` at start and at a reload; everything else here is
stateless. All of it runs on the event loop thread (aiohttp calls the access logger there).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from cached import metrics as metrics_module
from cached.metrics import Metrics, RequestStats

STATS = "cached.stats"  # request key of the request's RequestStats
# Python level -> syslog priority understood by journald's "<N>" prefix (sd-daemon(3)).
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def to_journal(environ: dict[str, str] | None = None, fd: int = 2) -> bool:
    """Whether ``fd`` is the journald stream systemd gave us (``$JOURNAL_STREAM=dev:inode``)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


# Characters that could end, hide or rewrite a log line: C0 controls (newline, carriage
# return, escape, NUL...), DEL, C1 controls (NEL), the Unicode line and paragraph
# separators, and lone surrogates (undecodable bytes; they would not even encode).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CONTROL_OR_QUOTE = re.compile(r'[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff"\\]')


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every control character written as ``\\xNN`` (``\\uNNNN`` above
    U+00FF): on one line, and nothing in it acts on a terminal."""
    return _CONTROL.sub(_escaped, text)


def escape_quoted(text: str) -> str:
    """:func:`escape`, and ``"`` and ``\\`` too: for a field the access line quotes."""
    return _CONTROL_OR_QUOTE.sub(_escaped, text)


class _Format(logging.Formatter):
    """A record's message on its first line; a traceback's lines indented under it."""

    def format(self, record: logging.LogRecord) -> str:
        first, *rest = super().format(record).split("\n")
        return "\n".join([first, *("    " + escape(line) for line in rest)])


class _JournalFormatter(_Format):
    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        # One entry per line in the journal: prefix each line of a traceback too.
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class _Mask(logging.Filter):
    """Replaces configured secrets in a record's final message (last line of defence), and
    escapes the control characters in it (:func:`escape`)."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: tuple[str, ...] = ()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = escape(message)
        for secret in self.secrets:
            masked = masked.replace(secret, "***")
        if masked != message:
            record.msg, record.args = masked, None
        return True


_mask = _Mask()


def make_handler(stream: TextIO, journal: bool = False) -> logging.Handler:
    """The daemon's handler on ``stream``: journald's format or timestamps, secrets masked
    and control characters escaped."""
    handler = logging.StreamHandler(stream)
    if journal:
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(_Format("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_mask)
    return handler


def configure(level: str, secrets: Iterable[str] = ()) -> None:
    """Log to stderr at ``level``: journald's format under systemd, timestamps otherwise."""
    handler = make_handler(sys.stderr, to_journal())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    set_level(level)
    set_secrets(secrets)


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level)
    # apscheduler narrates every job it adds and its own start at INFO; cached logs what
    # matters of that itself ("prune runs every 600 s"). At DEBUG everything is shown.
    quiet = logging.getLogger().getEffectiveLevel() > logging.DEBUG
    logging.getLogger("apscheduler").setLevel(logging.WARNING if quiet else logging.NOTSET)


def set_secrets(secrets: Iterable[str]) -> None:
    _mask.secrets = tuple(s for s in secrets if s)


# ---------------------------------------------------------------------------- access log
@web.middleware
async def observe(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Give the request its byte counters (reader and upstream streams add to them), and
    count the payload the response writer is given: a chunked response's ``body_length``
    includes the chunk framing (41,948,166 bytes logged for a 41,943,040-byte image)."""
    stats = request[STATS] = metrics_module.begin_request()
    writer = request.writer
    if getattr(writer, "on_body_write", 0) is None:  # aiohttp's hook, and nobody uses it
        stats.payload = 0

        def counted(body: int, _output: int) -> None:
            assert stats.payload is not None
            stats.payload += body

        writer.on_body_write = counted
    return await handler(request)


def _route(path: str) -> str:
    if path.startswith("/v2/images/") and path.endswith("/file"):
        return "image_data"
    if path in ("/metrics", "/healthz", "/readyz"):
        return "ops"
    if path.startswith("/cached-peer/"):
        return "peer"  # a sibling's request (cached/fleet/serve.py)
    if "/cache" in path or "cached_images" in path or "queued_images" in path:
        return "management"
    return "forward"


def _header_size(response: web.StreamResponse, version: tuple[int, int]) -> int:
    """Bytes of the status line and headers as aiohttp serialises them."""
    size = len(f"HTTP/{version[0]}.{version[1]} {response.status} {response.reason}\r\n") + 2
    for key, value in response.headers.items():
        size += len(key) + len(value) + 4
    return size


def body_bytes(request: web.BaseRequest, response: web.StreamResponse) -> int:
    """Bytes of the body that went out: through the response writer and by sendfile."""
    stats: RequestStats | None = request.get(STATS)
    if stats is not None and stats.payload:
        return stats.payload + stats.sent  # the payload, without any chunk framing
    written = response.body_length
    if written:
        written = max(0, written - _header_size(response, request.version))
    return written + (stats.sent if stats is not None else 0)


# Answered many times a minute to monitoring: not access-logged unless they fail.
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Query parameters whose values are never logged (a token in a URL is still a token).
_SECRET_PARAM = re.compile(r"token|password|passwd|secret|signature|sig|key", re.IGNORECASE)


def _path_and_query(request: web.BaseRequest) -> str:
    """The path with its query string, the values of credential-like parameters masked."""
    if not request.query_string:
        return request.path
    parts = []
    for item in request.query_string.split("&"):
        name, sep, _ = item.partition("=")
        parts.append(f"{name}=***" if sep and _SECRET_PARAM.search(name) else item)
    return f"{request.path}?{'&'.join(parts)}"


class AccessLogger(AbstractAccessLogger):
    """One line per request; also feeds the request metrics (whatever the log level)."""

    def __init__(self, logger: logging.Logger, log_format: str = "") -> None:
        super().__init__(logger, log_format)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        nbytes = body_bytes(request, response)
        cache_status = response.headers.get("Cache-Status")
        path = request.path
        metrics: Metrics | None = metrics_module.active()
        if metrics is not None:
            metrics.request_done(_route(path), response.status, cache_status, nbytes, time)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        if path in _QUIET_PATHS and response.status < 400:
            return  # health polls and scrapes, every few seconds: counted, not logged
        stats: RequestStats | None = request.get(STATS)
        upstream = stats.upstream if stats is not None else 0
        if metrics_module.outcome_of(cache_status) == "bypass":  # with a detail too
            upstream = nbytes
        try:
            match_info = getattr(request, "match_info", None)
        except AssertionError:  # a request refused before routing (malformed) has none
            match_info = None
        image = match_info.get("image_id", "-") if match_info else "-"
        content = getattr(request, "content", None)
        received = getattr(content, "total_bytes", 0) if content is not None else 0
        self.logger.info(
            '%s "%s %s HTTP/%d.%d" %d %d image=%s cache=%s upstream_bytes=%d duration=%.3f '
            "request_id=%s%s",
            escape_quoted(request.remote or "-"),
            escape_quoted(request.method),
            escape_quoted(_path_and_query(request)),
            request.version[0],
            request.version[1],
            response.status,
            nbytes,
            escape_quoted(image),
            escape_quoted(metrics_module.log_outcome(cache_status)),  # bypass:<reason>
            upstream,
            time,
            escape_quoted(response.headers.get("x-openstack-request-id", "-")),
            f" received={received}" if received else "",  # an upload's bytes
        )
