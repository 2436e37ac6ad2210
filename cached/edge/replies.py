"""Answers cached makes up itself when it cannot relay the upstream's (502, 500).

What went wrong stays in the daemon's log, under the request id the caller receives: the
body names no internal address, port or exception, since any unauthenticated caller can
provoke it. Stateless: called from request handlers on the event loop.
"""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

log = logging.getLogger("cached.replies")


def request_id() -> str:
    return f"req-{uuid.uuid4()}"


def glance_error(status: int, message: str, request_id: str) -> web.Response:
    """A webob-style plain text error page, as Glance sends its errors."""
    reason = web.Response(status=status).reason
    return web.Response(
        status=status,
        text=f"{status} {reason}\n\n{message}\n\n   ",
        content_type="text/plain",
        charset="UTF-8",
        headers={"x-openstack-request-id": request_id},
    )


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
    return glance_error(502, "The image service is unreachable.", rid)


def internal(request: web.Request, exc: BaseException) -> web.Response:
    """``500``: a failure of cached itself (logged with its traceback)."""
    rid = request_id()
    log.error("%s: %s %s failed", rid, request.method, request.path[:200], exc_info=exc)
    return glance_error(
        500,
        "The server has either erred or is incapable of performing the requested operation.",
        rid,
    )
