"""Answers cached makes up itself when it cannot relay the upstream's (502, 500).

What went wrong stays in the daemon's log, under the request id the caller receives: the
body names no internal address, port or exception, since any unauthenticated caller can
provoke it. Stateless: called from request handlers on the event loop.
"""

from __future__ import annotations

import html
import logging
import uuid

from aiohttp import web

log = logging.getLogger("cached.replies")


def request_id() -> str:
    return f"req-{uuid.uuid4()}"


# Seconds a client is told to wait before trying again after cached's own 502/503.
RETRY_AFTER = 10


def glance_error(status: int, message: str, request_id: str, accept: str = "") -> web.Response:
    """An error as Glance (webob) sends it: JSON when the client's ``Accept`` names
    ``application/json`` (``code``, ``title``, ``message``, with the line breaks of webob's
    template), else a plain text page; ``Retry-After`` on 502 and 503."""
    reason = web.Response(status=status).reason
    headers = {"x-openstack-request-id": request_id}
    if status in (502, 503):
        headers["Retry-After"] = str(RETRY_AFTER)
    if "application/json" in accept:
        return web.json_response(
            {
                "message": f"{message}<br /><br />\n\n\n",
                "code": f"{status} {reason}",
                "title": reason,
            },
            status=status,
            headers=headers,
        )
    return web.Response(
        status=status,
        text=f"{status} {reason}\n\n{message}\n\n   ",
        content_type="text/plain",
        charset="UTF-8",
        headers=headers,
    )


def webob_error(status: int, message: str, request_id: str, accept: str | None) -> web.Response:
    """An error exactly as webob's ``HTTPException`` renders it for Glance, with the content
    type webob picks from ``Accept`` among ``text/html`` and ``application/json`` (HTML
    first on a tie, as for ``*/*``; plain text when ``Accept`` is absent, empty or names
    neither). :func:`glance_error` gives the JSON or plain text forms only."""
    reason = web.Response(status=status).reason
    headers = {"x-openstack-request-id": request_id}
    kind = _webob_offer(accept)
    if kind == "application/json":
        return web.json_response(
            {
                "message": f"{message}<br /><br />\n\n\n",
                "code": f"{status} {reason}",
                "title": reason,
            },
            status=status,
            headers=headers,
        )
    if kind == "text/html":
        page = (
            f"<html>\n <head>\n  <title>{status} {reason}</title>\n </head>\n <body>\n"
            f"  <h1>{status} {reason}</h1>\n  {html.escape(message, quote=True)}"
            "<br /><br />\n\n\n\n </body>\n</html>"
        )
        return web.Response(
            status=status, text=page, content_type="text/html", charset="UTF-8", headers=headers
        )
    return web.Response(
        status=status,
        text=f"{status} {reason}\n\n{message}\n\n   ",
        content_type="text/plain",
        charset="UTF-8",
        headers=headers,
    )


_OFFERS = ("text/html", "application/json")


def _webob_offer(accept: str | None) -> str:
    """webob's ``acceptable_offers(["text/html", "application/json"])[0]``, else text/plain."""
    if not accept or not accept.strip():
        return "text/plain"
    ranges: list[tuple[str, str, float]] = []
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        kind, _, sub = fields[0].lower().partition("/")
        if not kind or not sub:
            return _OFFERS[0]  # an invalid header: webob offers everything, in order
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    return _OFFERS[0]
        ranges.append((kind, sub, q))
    best, best_q = "text/plain", 0.0
    for offer in _OFFERS:
        kind, _, sub = offer.partition("/")
        # The most specific range that matches decides the offer's quality.
        matches = [
            (2 if (k, s) == (kind, sub) else 1 if (k, s) == (kind, "*") else 0, q)
            for k, s, q in ranges
            if (k, s) in ((kind, sub), (kind, "*"), ("*", "*"))
        ]
        if matches:
            q = max(matches)[1]
            if q > best_q:
                best, best_q = offer, q
    return best


def unreachable(request: web.Request, exc: BaseException) -> web.Response:
    """``502``: the upstream could not be reached or broke off before answering."""
    rid = request_id()
    log.warning(
        "%s: %s %s: the image service is unreachable: %s",
        rid,
        request.method,
        request.path[:200],
        exc,
    )
    accept = request.headers.get("Accept", "")
    return glance_error(502, "The image service is unreachable.", rid, accept)


def internal(request: web.Request, exc: BaseException) -> web.Response:
    """``500``: a failure of cached itself (logged with its traceback)."""
    rid = request_id()
    log.error("%s: %s %s failed", rid, request.method, request.path[:200], exc_info=exc)
    return glance_error(
        500,
        "The server has either erred or is incapable of performing the requested operation.",
        rid,
        request.headers.get("Accept", ""),
    )
