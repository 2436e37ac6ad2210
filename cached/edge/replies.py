"""Answers cached makes up itself (its own 4xx, 502, 503, 500): every error cached answers
on the public listener is made here, in Glance's shape for the client's ``Accept``.

What went wrong stays in the daemon's log, under the request id the caller receives: the
body names no internal address, port or exception, since any unauthenticated caller can
provoke it. Stateless: called from request handlers on the event loop.
"""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

from cached.upstream import pages

log = logging.getLogger("cached.replies")


def request_id() -> str:
    return f"req-{uuid.uuid4()}"


# Seconds a client is told to wait before trying again after cached's own 502/503.
RETRY_AFTER = 10


def glance_error(
    status: int, message: str, request_id: str, accept: str | None = None, detail: str = ""
) -> web.Response:
    """An error as Glance (webob) sends it, in the shape the client's ``Accept`` asks for
    (JSON, an HTML page, or plain text: ``cached/upstream/pages.py``); ``Retry-After`` on
    502 and 503."""
    page = pages.render(status, message, accept, detail)
    headers = {"x-openstack-request-id": request_id, "Content-Type": page.content_type}
    if status in (502, 503):
        headers["Retry-After"] = str(RETRY_AFTER)
    return web.Response(status=status, body=page.body, headers=headers)


def error(
    request: web.Request, status: int, message: str, rid: str = "", detail: str = ""
) -> web.Response:
    """:func:`glance_error` for ``request``, in the shape its ``Accept`` asks for (``rid``:
    the request id to give, a new one by default)."""
    return glance_error(status, message, rid or request_id(), _accept(request), detail)


# webob's explanation of a 416, the first line of Glance's page.
RANGE_NOT_AVAILABLE = "The Range requested is not available."


def unsatisfiable(request: web.Request, size: int, detail: str, rid: str = "") -> web.Response:
    """Glance 33's ``416`` for a Range it does not serve (``detail``: why), with the
    ``Content-Range: bytes */size`` RFC 9110 §15.5.17 asks for."""
    response = error(request, 416, RANGE_NOT_AVAILABLE, rid, detail)
    response.headers["Content-Range"] = f"bytes */{size}"
    return response


def _accept(request: web.Request) -> str | None:
    return request.headers.get("Accept")


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
    return glance_error(502, "The image service is unreachable.", rid, _accept(request))


def internal(request: web.Request, exc: BaseException) -> web.Response:
    """``500``: a failure of cached itself (logged with its traceback)."""
    rid = request_id()
    log.error("%s: %s %s failed", rid, request.method, request.path[:200], exc_info=exc)
    return glance_error(
        500,
        "The server has either erred or is incapable of performing the requested operation.",
        rid,
        _accept(request),
    )
